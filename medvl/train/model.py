"""What each training worker starts from: a previous stage's HF model, real towers, or a tiny preset."""

from __future__ import annotations

from medvl.model.build import TinyPreset, build_from_pretrained, build_tiny, load_hf
from medvl.tokenizer import load as load_tokenizer
from medvl.train.config import TrainConfig


def tokenizer_uri(cfg: TrainConfig) -> str:
    return cfg.init or cfg.tokenizer or cfg.llm


def build_model(cfg: TrainConfig):
    tok = load_tokenizer(tokenizer_uri(cfg))
    if cfg.init:
        return load_hf(cfg.init), tok
    if cfg.vision_tower and cfg.llm:
        return build_from_pretrained(cfg.vision_tower, cfg.llm, tok), tok
    return build_tiny(tok, TinyPreset(), seed=cfg.seed), tok
