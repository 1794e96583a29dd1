"""Original LLaVA / Qilin-Med-VL checkpoints <-> HF ``LlavaForConditionalGeneration``.

The released Qilin-Med-VL, LLaVA and LLaVA-Med weights use the original layout:
``LlavaLlamaForCausalLM`` with ``model.mm_projector.{0,2}``, the LLM at ``model.*`` and a
``mm_vision_tower`` naming a CLIP directory the user has elsewhere. ``convert_llava``
maps every key explicitly and refuses to write a model when a key is unknown or a
parameter is left unfilled, so a partial load can never pass silently.
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPVisionModel, LlamaConfig, LlavaForConditionalGeneration

from medvl import storage
from medvl.model.build import llava_config
from medvl.tokenizer import prepare
from medvl.train.export import save_hf

PROJECTOR = {"model.mm_projector.0.": "model.multi_modal_projector.linear_1.",
             "model.mm_projector.2.": "model.multi_modal_projector.linear_2."}
# In original checkpoints but not parameters of the HF model: rotary caches, and a frozen
# vision-tower copy that is taken from --vision-tower instead (as LLaVA itself does).
IGNORED = re.compile(r"(\.rotary_emb\.inv_freq$|^model\.vision_tower\.)")


class ConversionError(ValueError):
    pass


def load_state_dict(directory: str) -> dict[str, torch.Tensor]:
    """All shards of a checkpoint directory: safetensors, or ``.bin`` with weights_only=True."""
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    loader = load_file
    if not files:
        files = sorted(f for f in os.listdir(directory) if f.endswith(".bin") and "optimizer" not in f)
        loader = lambda p: torch.load(p, map_location="cpu", weights_only=True)  # noqa: E731
    if not files:
        raise ConversionError(f"{directory}: no .safetensors or .bin weights found")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(loader(os.path.join(directory, f)))
    return state


def map_key(key: str) -> str | None:
    """Original key -> HF Llava key (None: deliberately not carried over)."""
    for old, new in PROJECTOR.items():
        if key.startswith(old):
            return new + key[len(old):]
    if IGNORED.search(key):
        return None
    if key == "lm_head.weight":
        return key
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    raise ConversionError(f"unknown key in the original checkpoint: {key}")


def _check_llava_config(cfg: dict) -> None:
    if cfg.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ConversionError(f"projector type {cfg['mm_projector_type']!r}: only mlp2x_gelu is supported")
    if cfg.get("mm_vision_select_feature", "patch") != "patch":
        raise ConversionError("only mm_vision_select_feature=patch (CLS dropped) is supported")
    if cfg.get("mm_use_im_start_end"):
        raise ConversionError("mm_use_im_start_end=true checkpoints are not supported")


def convert_llava(src: str, vision_tower: str, dst: str) -> LlavaForConditionalGeneration:
    """Convert an original-layout LLaVA directory (+ a CLIP directory) into an HF one at ``dst``."""
    with storage.local_dir(src) as src_dir, storage.local_dir(vision_tower) as vit_dir:
        with open(os.path.join(src_dir, "config.json"), encoding="utf-8") as f:
            raw = json.load(f)
        _check_llava_config(raw)
        tok = prepare(AutoTokenizer.from_pretrained(src_dir))
        vision = CLIPVisionModel.from_pretrained(vit_dir)
        state = load_state_dict(src_dir)
    llama_fields = set(LlamaConfig().to_dict())  # everything else is LLaVA's or bookkeeping
    text_cfg = LlamaConfig(**{k: v for k, v in raw.items() if k in llama_fields
                              and k not in ("architectures", "model_type", "transformers_version")})
    config = llava_config(vision.config, text_cfg, tok)
    config.vision_feature_layer = raw.get("mm_vision_select_layer", -2)
    model = LlavaForConditionalGeneration(config)

    mapped = {}
    for key, tensor in state.items():
        new = map_key(key)
        if new is not None:
            mapped[new] = tensor
    mapped.update({f"model.vision_tower.{k}": v for k, v in vision.state_dict().items()})
    _load_exact(model, mapped, old_vocab=raw["vocab_size"])
    aspect = "pad" if raw.get("image_aspect_ratio") == "pad" else "crop"
    save_hf(model, tok, dst, "v1", aspect)
    return model.eval()


def _load_exact(model: LlavaForConditionalGeneration, state: dict[str, torch.Tensor], old_vocab: int) -> None:
    """Copy every tensor in; new token rows get the mean embedding. Any gap is an error."""
    params = dict(model.state_dict())
    unknown = sorted(set(state) - set(params))
    missing = sorted(k for k in params if k not in state and not k.endswith(("position_ids", "inv_freq")))
    if unknown or missing:
        raise ConversionError(f"state dict does not match the model: unknown {unknown[:10]}, "
                              f"missing {missing[:10]}")
    with torch.no_grad():
        for key, tensor in state.items():
            target = params[key]
            if key.endswith(("embed_tokens.weight", "lm_head.weight")) and tensor.shape[0] == old_vocab:
                target[:old_vocab] = tensor
                target[old_vocab:] = tensor.mean(dim=0)  # <image>/<pad> rows
            elif target.shape != tensor.shape:
                raise ConversionError(f"{key}: shape {tuple(tensor.shape)} != {tuple(target.shape)}")
            else:
                target.copy_(tensor)


def export_projector(model: LlavaForConditionalGeneration, path: str) -> None:
    """The projector alone as LLaVA's ``mm_projector.bin`` (``pretrain_mm_mlp_adapter``)."""
    proj = model.model.multi_modal_projector
    state = {f"{old}{name}": t.detach().clone().contiguous()
             for old, layer in zip(PROJECTOR, (proj.linear_1, proj.linear_2), strict=True)
             for name, t in layer.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(state, path)
