"""GPU serving through ``ray.serve.llm`` (vLLM), for the same exported HF directory.

vLLM loads ``LlavaForConditionalGeneration`` directories natively and exposes the same
OpenAI routes, with paged attention and continuous batching; on CPU our own deployment
(``medvl.serving.app``) is used instead. Needs ``pip install "ray[llm]"`` on GPU nodes.
"""

from __future__ import annotations

from ray import serve

from medvl.serving.api import ServeConfig


def build_vllm_app(cfg: ServeConfig, options: dict | None = None) -> serve.Application:
    """``options`` (``placement.deployment_options``) give the replicas' accelerator and bounds."""
    try:
        from ray.serve.llm import LLMConfig, build_openai_app
    except ImportError as e:
        raise ImportError(f"backend: vllm needs vLLM on the serving nodes "
                          f"(pip install 'ray[llm]'): {e}") from e
    actor = (options or {}).get("ray_actor_options", {})
    llm = LLMConfig(
        model_loading_config={"model_id": cfg.model_name, "model_source": cfg.model},
        engine_kwargs={"max_model_len": cfg.max_prompt_tokens + cfg.max_tokens_cap},
        accelerator_type=actor.get("accelerator_type"),
        deployment_config={"autoscaling_config": (options or {}).get(
            "autoscaling_config", {"min_replicas": 2, "max_replicas": 4})},  # GPU clusters: no single point
    )
    return build_openai_app({"llm_configs": [llm]})
