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


def test_vllm_backend_keeps_our_front_and_every_setting():
    """``backend: vllm`` puts vLLM behind our HTTP front, which gets every field (keys, limits,
    SSRF allow-list); before, ray.serve.llm's own app served it and these were refused. The
    app builds without vLLM here: only the model replicas import it."""
    from medvl.serving.app import build_app
    from medvl.serving.vllm import VLLMDeployment

    args = {"model": "/models/x", "backend": "vllm", "api_key_file": "/keys.txt", "max_body_bytes": 1000,
            "allowed_image_hosts": ["pacs.example"], "max_requests_per_key": 3}
    front = build_app(args)._bound_deployment
    cfg, model = front.init_args
    assert front.name == "MedVLChat"
    assert model._bound_deployment.name == "MedVLModel"
    assert model._bound_deployment.func_or_class is VLLMDeployment.func_or_class
    assert {k: getattr(cfg, k) for k in args} == {**args, "model": "/models/x"}
