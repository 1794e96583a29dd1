"""The final model, written by the training workers as an HF directory.

Parameters are gathered one transformer block at a time (under ZeRO-3 every rank takes
part; under ZeRO-2 nothing is partitioned and gathering is a no-op) and rank 0 streams each
tensor, in the training dtype, into a safetensors shard of at most ``max_shard_bytes``
(with ``model.safetensors.index.json``), uploaded to ``OUTPUT/hf`` (local disk or S3) when
complete. A shard's header is written first, from the parameters' shapes alone, so no
process ever holds a shard in memory: rank 0 holds one gathered block and, on a GPU, one
tensor's host copy (``safetensors.torch.save_file`` would hold the shard twice: 10 GB of
host RAM per 5 GB shard at 13B). The driver never loads weights at all. The models we build
(CLIP + Llama/Qwen2) have no persistent buffers, so parameters are the whole state.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile

import torch

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


_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


class ShardWriter:
    """One safetensors file written a tensor at a time: the header (names, dtypes, shapes,
    offsets) first, from ``layout`` (meta tensors), then each tensor's bytes as it comes, in
    layout order. The bytes go from the tensor's own memory to the file, without a copy."""

    def __init__(self, path: str, layout: dict[str, torch.Tensor]):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key, t in layout.items():
            n = t.numel() * t.element_size()
            header[key] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
            offset += n
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # tensor data 8-byte aligned, as safetensors writes it
        self.layout, self.pending = layout, iter(layout)
        self.file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.file.write(len(text).to_bytes(8, "little") + text)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        expected = next(self.pending, None)
        want = self.layout.get(expected)
        if key != expected or tensor.shape != want.shape or tensor.dtype != want.dtype:
            raise ValueError(f"{key} {tuple(tensor.shape)} {tensor.dtype}: not the next tensor of the shard header")
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        self.file.write(data.view(torch.uint8).numpy().data)

    def finish(self) -> None:
        """Check that every tensor of the header was written."""
        missing = list(self.pending)
        if missing:
            raise ValueError(f"shard ends without {missing}")

    def close(self) -> None:
        self.file.close()


def _unit_tensors(group, lora: tuple[int, int] | None, meta: bool = False) -> dict[str, torch.Tensor]:
    """One unit's tensors as the files name them, LoRA merged; ``meta``: shapes and dtypes
    only (the full shapes, also of ZeRO-3 partitions), for a shard's header."""
    if meta:
        tensors = {name: torch.empty(getattr(p, "ds_shape", p.shape), dtype=p.dtype, device="meta")
                   for name, p in group}
    else:
        tensors = {name: p.detach() for name, p in group}
    tensors = merge_lora(tensors, *lora) if lora else tensors
    return {checkpoint_key(name): t for name, t in tensors.items()}


def _write_shard(groups, shard: list[int], rank: int, lora: tuple[int, int] | None, path: str) -> dict:
    """Collective: gather the shard's units one at a time, rank 0 streaming each to ``path``.
    Returns the shard's tensors as meta tensors (names and sizes for the index)."""
    import deepspeed

    layout = {k: t for i in shard for k, t in _unit_tensors(groups[i], lora, meta=True).items()}
    writer = ShardWriter(path, layout) if rank == 0 else None
    with contextlib.closing(writer) if writer else contextlib.nullcontext():
        for i in shard:
            with deepspeed.zero.GatheredParameters([p for _, p in groups[i]], modifier_rank=None):
                for key, tensor in (_unit_tensors(groups[i], lora) if writer else {}).items():
                    writer.write(key, tensor)
        if writer:
            writer.finish()
    return layout


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
            local = os.path.join(tmp, fname)
            layout = _write_shard(groups, shard, rank, lora, local)
            if rank != 0:
                continue
            storage.upload_file(local, storage.join(uri, fname))
            os.remove(local)  # one shard on local disk at a time
            weight_map.update(dict.fromkeys(layout, fname))
            total += sum(t.numel() * t.element_size() for t in layout.values())
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
