"""What learns and how fast: the optimizer's parameter groups per curriculum stage and the
LR schedule (linear warm-up, then cosine), shared by the Ray loop and the benchmarks."""

from __future__ import annotations

import math

from medvl.train.config import TrainConfig
from medvl.train.lora import add_lora


def trainable_groups(model, cfg: TrainConfig) -> list[dict]:
    """Optimizer param groups. Stage 1: projector. Stage 2: + LLM (or its LoRA adapters).

    The vision tower always stays frozen; the projector may have its own lr (LLaVA's
    ``mm_projector_lr``).
    """
    for p in model.parameters():
        p.requires_grad = False
    groups = [{"params": list(model.model.multi_modal_projector.parameters()),
               "lr": cfg.mm_projector_lr or cfg.lr}]
    if cfg.stage == 2:
        llm = model.model.language_model
        if cfg.lora_r:
            add_lora(llm, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
            params = [p for n, p in llm.named_parameters() if "lora_" in n]
        else:
            params = [*llm.parameters(), *model.lm_head.parameters()]
        groups.append({"params": params, "lr": cfg.lr})
    for g in groups:
        for p in g["params"]:
            p.requires_grad = True
    return groups


def adamw(model, cfg: TrainConfig):
    """The recipe's AdamW over the trainable groups, fused on CPU too: the per-tensor AdamW
    made two temporaries the size of the optimizer's parameters at each step (ZeRO-3 on 2
    ranks: +1 W on the worker's peak, and 12x the step's time; benchmarks/memory.py). One
    kernel per step on GPU, as benchmarked."""
    import torch

    return torch.optim.AdamW(trainable_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def lr_lambda(total: int, warmup_ratio: float):
    warmup = max(1, math.ceil(total * warmup_ratio))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return f
