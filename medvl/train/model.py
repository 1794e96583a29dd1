"""What each training worker starts from: a previous stage's HF model, real towers, or a tiny
preset, loaded straight into the training dtype and made ready to train."""

from __future__ import annotations

import torch

from medvl.model.build import TinyPreset, build_from_pretrained, build_tiny, load_hf
from medvl.tokenizer import load as load_tokenizer
from medvl.train.config import TrainConfig
from medvl.train.zero import deepspeed_config, partitioned_loading


def tokenizer_uri(cfg: TrainConfig) -> str:
    return cfg.init or cfg.tokenizer or cfg.llm


def training_dtype(cfg: TrainConfig) -> torch.dtype:
    """bf16 on GPU as the paper trains (half the host and GPU memory of fp32); fp32 on CPU."""
    return torch.bfloat16 if cfg.bf16 else torch.float32


def build_model(cfg: TrainConfig):
    """(model in train mode, tokenizer): the one entry the worker loop and benchmarks use."""
    tok = load_tokenizer(tokenizer_uri(cfg))
    dtype = training_dtype(cfg)
    if cfg.init:  # ZeRO-3: each rank materialises only its partition (see partitioned_loading)
        with partitioned_loading(deepspeed_config(cfg)):
            model = load_hf(cfg.init, dtype)
    elif cfg.vision_tower and cfg.llm:
        model = build_from_pretrained(cfg.vision_tower, cfg.llm, tok, dtype,
                                      loading=partitioned_loading(deepspeed_config(cfg)))
    else:  # random init, small: built whole, DeepSpeed partitions it at initialize
        model = build_tiny(tok, TinyPreset(), seed=cfg.seed).to(dtype)
    # Every path, towers included (loaded separately, each with its own config).
    model.set_attn_implementation(cfg.attn_implementation)
    return prepare_for_training(model, cfg.gradient_checkpointing), tok


def prepare_for_training(model, gradient_checkpointing: bool):
    """Train mode, no KV cache, and (optionally) activation recomputation.

    HF recomputes a layer in backward only while the layer is in training mode, and a
    forward builds a KV cache unless told not to; a model fresh from ``from_pretrained``
    is in eval mode with the cache on. The LLM goes to train mode even when frozen
    (stage 1): its activations carry the projector's gradient, so checkpointing matters
    there too. The vision tower is always frozen and sees no gradient, so it keeps
    nothing for backward and stays in eval mode.
    """
    model.config.text_config.use_cache = False  # the LLM's config: LlavaConfig has no use_cache
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model.model.vision_tower.eval()
    return model
