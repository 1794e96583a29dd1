"""serve/config.yaml is a valid Serve config whose app args are a valid ServeConfig."""

from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

from medvl import config
from medvl.serving.api import ServeConfig

CONFIG = Path(__file__).parents[2] / "serve" / "config.yaml"


def test_serve_config_file_validates():
    doc = yaml.safe_load(CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(doc)  # Ray's own schema, as `serve deploy` uses
    (app,) = schema.applications
    assert app.import_path == "medvl.serving.app:build_app"
    cfg = config.from_dict(ServeConfig, app.args)
    assert cfg.backend == "medvl" and cfg.max_batch_size >= 1


def test_vllm_backend_without_vllm_is_a_clear_error():
    import pytest

    from medvl.serving.app import build_app

    with pytest.raises(ImportError, match=r"ray\[llm\]"):
        build_app({"model": "/models/x", "backend": "vllm"})
