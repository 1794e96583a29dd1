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


def test_vllm_backend_refuses_settings_it_would_drop(monkeypatch):
    """API keys and our limits are not passed to ray.serve.llm: a clear refusal at start-up,
    not a server that silently lets everyone in."""
    import pytest

    from medvl.serving.app import build_app

    with pytest.raises(ValueError, match=r"cannot honour max_body_bytes, api_key_file"):
        build_app({"model": "/models/x", "backend": "vllm", "api_key_file": "/keys.txt", "max_body_bytes": 1000})
    monkeypatch.setenv("MEDVL_API_KEYS", "sk-1")
    with pytest.raises(ValueError, match=r"\$MEDVL_API_KEYS"):
        build_app({"model": "/models/x", "backend": "vllm"})
