"""Optional LoRA for stage 2 (peft), merged back at export so the result is a plain model."""

from __future__ import annotations

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def add_lora(module: torch.nn.Module, r: int, alpha: int, dropout: float) -> None:
    """Inject LoRA adapters into every attention/MLP projection of ``module``, in place."""
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=TARGETS),
                            module)


def merge_lora(state: dict[str, torch.Tensor], r: int, alpha: int) -> dict[str, torch.Tensor]:
    """State dict with ``base_layer`` + ``lora_A/B`` -> plain weights ``W + (B @ A) * alpha / r``."""
    merged = {}
    for key, tensor in state.items():
        if ".lora_" in key:
            continue
        if ".base_layer." in key:
            prefix, leaf = key.split(".base_layer.")
            if leaf == "weight":
                a = state[f"{prefix}.lora_A.default.weight"]
                b = state[f"{prefix}.lora_B.default.weight"]
                delta = (b.float() @ a.float()) * (alpha / r)  # in fp32, then the training dtype
                tensor = (tensor.float() + delta).to(tensor.dtype)
            key = f"{prefix}.{leaf}"
        merged[key] = tensor
    return merged
