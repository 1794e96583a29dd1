"""GPU serving through ``ray.serve.llm`` (vLLM), for the same exported HF directory.

vLLM loads ``LlavaForConditionalGeneration`` directories natively and exposes the same
OpenAI routes, with paged attention and continuous batching; on CPU our own deployment
(``medvl.serving.app``) is the default there, and vLLM's CPU build (``make vllm``) serves
through this path too when the replicas are given no GPU. Needs ``pip install "ray[llm]"``.
"""

from __future__ import annotations

import dataclasses
import os

from ray import serve

from medvl.serving.api import ServeConfig

# What ray.serve.llm's OpenAI app is given from a ServeConfig; every other field set away
# from its default would be silently dropped (API keys above all), so it is refused instead.
HONOURED = {"model", "model_name", "backend", "max_prompt_tokens", "max_tokens_cap"}


def unhonoured(cfg: ServeConfig) -> list[str]:
    """The settings ``backend: vllm`` cannot honour: fields off their defaults, and API keys
    found in the environment (``api_keys_env``)."""
    default = ServeConfig()
    fields = [f.name for f in dataclasses.fields(cfg)
              if f.name not in HONOURED and getattr(cfg, f.name) != getattr(default, f.name)]
    if os.environ.get(cfg.api_keys_env):
        fields.append(f"${cfg.api_keys_env}")
    return fields


def build_vllm_app(cfg: ServeConfig, options: dict | None = None) -> serve.Application:
    """``options`` (``placement.deployment_options``) give the replicas' accelerator and bounds.
    Refuses, at start-up, any setting our own ingress would enforce but vLLM's does not."""
    if bad := unhonoured(cfg):
        raise ValueError(f"backend: vllm cannot honour {', '.join(bad)} (ray.serve.llm's OpenAI app has no "
                         "API keys, body/image limits, SSRF guard or batching settings of ours); "
                         "unset them, or serve with backend: medvl")
    try:
        from ray.serve.llm import LLMConfig, build_openai_app
    except ImportError as e:
        raise ImportError(f"backend: vllm needs vLLM on the serving nodes "
                          f"(pip install 'ray[llm]'): {e}") from e
    actor = (options or {}).get("ray_actor_options", {})
    # Replicas placed without a GPU run vLLM's CPU build (its multiprocessing executor: vLLM's
    # CPU platform refuses the Ray executor that ray.serve.llm picks for GPUs).
    on_cpu = options is not None and not actor.get("num_gpus")
    hardware = ({"accelerator_config": {"kind": "cpu"}} if on_cpu
                else {"accelerator_type": actor.get("accelerator_type")})
    llm = LLMConfig(
        model_loading_config={"model_id": cfg.model_name, "model_source": cfg.model},
        engine_kwargs={"max_model_len": cfg.max_prompt_tokens + cfg.max_tokens_cap},
        **hardware,
        deployment_config={"autoscaling_config": (options or {}).get(
            "autoscaling_config", {"min_replicas": 2, "max_replicas": 4})},  # GPU clusters: no single point
    )
    return build_openai_app({"llm_configs": [llm]})
