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


def test_vllm_backend_is_built_or_refused_clearly():
    """With ray[llm] installed the vLLM app is built; without it, a clear error (never both)."""
    import importlib.util

    import pytest
    from ray import serve

    from medvl.serving.app import build_app

    args = {"model": "/models/x", "backend": "vllm"}
    try:
        has_llm = importlib.util.find_spec("ray.serve.llm") is not None
        if has_llm:
            import ray.serve.llm  # noqa: F401  (present but unusable without vLLM counts as absent)
    except ImportError:
        has_llm = False
    if has_llm:
        assert isinstance(build_app(args), serve.Application)
    else:
        with pytest.raises(ImportError, match=r"ray\[llm\]"):
            build_app(args)
