"""The final model, written by the training workers as an HF directory.

Parameters are gathered one transformer block at a time (under ZeRO-3 every rank takes
part; under ZeRO-2 nothing is partitioned and gathering is a no-op), copied to rank 0's
host in the training dtype and written as safetensors shards of at most
``max_shard_bytes`` with ``model.safetensors.index.json``, straight to ``OUTPUT/hf``
(local disk or S3). Rank 0 holds at most one shard plus one block; no process ever holds
the whole model in fp32 and the driver never loads weights at all. The models we build
(CLIP + Llama/Qwen2) have no persistent buffers, so parameters are the whole state.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Iterator

import torch
from safetensors.torch import save_file

from medvl import storage
from medvl.model.build import checkpoint_key, processor_for
from medvl.serving.engine import write_meta
from medvl.train.lora import merge_lora
from medvl.train.zero import block_classes

INDEX_FILE = "model.safetensors.index.json"


def units(model: torch.nn.Module) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """Parameters grouped for gathering: each transformer block together, any other
    parameter (embeddings, norms, projector, head) alone, in ``named_parameters`` order."""
    owner = {}
    blocks = tuple(block_classes(model))
    for name, module in model.named_modules():
        if blocks and isinstance(module, blocks):
            for p in module.parameters():
                owner.setdefault(id(p), name)
    groups: list[list[tuple[str, torch.nn.Parameter]]] = []
    last = None
    for name, p in model.named_parameters():
        key = owner.get(id(p), name)
        if key != last or not groups:
            groups.append([])
        groups[-1].append((name, p))
        last = key
    return groups


def _nbytes(p: torch.nn.Parameter) -> int:
    return getattr(p, "ds_numel", p.numel()) * p.element_size()  # ZeRO-3 keeps the full size in ds_numel


def plan_shards(groups: list[list], max_shard_bytes: int) -> list[list[int]]:
    """Group indices per shard, filled in order; a unit larger than the limit gets its own shard."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, group in enumerate(groups):
        n = sum(_nbytes(p) for _, p in group)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


def _gathered(groups, shard: list[int], rank: int, lora: tuple[int, int] | None) -> Iterator[dict]:
    """Each unit's full tensors on rank 0's host (empty dicts elsewhere), one unit at a time."""
    import deepspeed

    for i in shard:
        params = [p for _, p in groups[i]]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):  # every rank gathers
            tensors = ({name: p.detach().to("cpu", copy=True).contiguous() for name, p in groups[i]}
                       if rank == 0 else {})
        tensors = merge_lora(tensors, *lora) if lora and tensors else tensors
        yield {checkpoint_key(name): t for name, t in tensors.items()}


def export_hf(module: torch.nn.Module, tok, uri: str, rank: int, meta: dict,
              max_shard_bytes: int, lora: tuple[int, int] | None = None) -> None:
    """Collective: every rank calls it; rank 0 writes weights, config, tokenizer, processor."""
    groups = units(module)
    shards = plan_shards(groups, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    with tempfile.TemporaryDirectory(prefix="medvl-export-") as tmp:
        for shard, fname in zip(shards, names, strict=True):
            tensors: dict[str, torch.Tensor] = {}
            for part in _gathered(groups, shard, rank, lora):
                tensors.update(part)
            if rank != 0:
                continue
            local = os.path.join(tmp, fname)
            save_file(tensors, local, metadata={"format": "pt"})
            storage.upload_file(local, storage.join(uri, fname))
            os.remove(local)  # one shard on local disk at a time
            weight_map.update(dict.fromkeys(tensors, fname))
            total += sum(t.numel() * t.element_size() for t in tensors.values())
        if rank == 0:
            _write_side_files(module, tok, uri, tmp, weight_map, total, len(shards) > 1, meta)
            write_meta(uri, **meta)


def save_hf(model: torch.nn.Module, tok, uri: str, template: str = "v1", aspect: str = "pad",
            max_shard_bytes: int = 5 * 10**9) -> None:
    """One process, a model in memory (tests, ``medvl convert``): the same directory as a run's."""
    image_size = model.config.vision_config.image_size
    export_hf(model, tok, uri, 0, {"template": template, "aspect": aspect, "image_size": image_size},
              max_shard_bytes)


def _write_side_files(module, tok, uri: str, tmp: str, weight_map: dict, total: int, sharded: bool,
                      meta: dict) -> None:
    """config (the training dtype, KV cache back on for inference), generation config,
    tokenizer + processor and, when sharded, the index."""
    side = os.path.join(tmp, "side")
    config = copy.deepcopy(module.config)
    config.dtype = module.dtype
    config.architectures = [type(module).__name__]  # what vLLM and AutoModel pick the class by
    config.text_config.use_cache = True
    config.save_pretrained(side)
    if module.can_generate():
        module.generation_config.save_pretrained(side)
    processor_for(module, tok, meta["template"], meta["aspect"]).save_pretrained(side)
    if sharded:
        with open(os.path.join(side, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    for name in os.listdir(side):
        storage.upload_file(os.path.join(side, name), storage.join(uri, name))
