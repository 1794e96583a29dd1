"""Micro batches: the collate step that turns rows into tensors, and the padding it costs.

Which rows form each batch is the feed's plan (``feed.py``).
"""

from __future__ import annotations

import numpy as np
import torch

from medvl.data.images import CLIP_MEAN, CLIP_STD
from medvl.data.tokenize import IGNORE


def padding_fraction(lengths: np.ndarray, rows: np.ndarray, micro: int) -> float:
    """Share of padded positions when rows, in feed order, form micro batches of ``micro``
    rows each padded to its longest row."""
    batches = lengths[rows[: len(rows) // micro * micro].reshape(-1, micro)]
    return float(1.0 - batches.sum() / (batches.max(axis=1) * micro).sum())


def collate(batch: dict, pad_id: int, image_size: int) -> dict[str, torch.Tensor]:
    """Right-pad one micro batch (on the host, in the feed's prefetch threads); pixels stay
    uint8 (``model_inputs`` normalises them where the model runs)."""
    ids, labels = batch["input_ids"], batch["labels"]
    width = max(len(x) for x in ids)
    out_ids = np.full((len(ids), width), pad_id, np.int64)
    out_labels = np.full((len(ids), width), IGNORE, np.int64)
    mask = np.zeros((len(ids), width), np.int64)
    for i, (x, y) in enumerate(zip(ids, labels, strict=True)):
        out_ids[i, : len(x)], out_labels[i, : len(y)], mask[i, : len(x)] = x, y, 1
    pix = np.stack([np.frombuffer(p, np.uint8).reshape(image_size, image_size, 3) for p in batch["pixels"]])
    return {"input_ids": torch.from_numpy(out_ids), "labels": torch.from_numpy(out_labels),
            "attention_mask": torch.from_numpy(mask), "pixels": torch.from_numpy(pix)}


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """A collated batch on ``device``, uint8 HWC pixels -> CLIP-normalised float CHW
    ``pixel_values`` there: on a GPU that costs no host CPU and copies 4x fewer bytes."""
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "pixels"}
    pix = batch["pixels"].to(device, non_blocking=True).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN, device=pix.device)[:, None, None]
    std = torch.tensor(CLIP_STD, device=pix.device)[:, None, None]
    out["pixel_values"] = (pix - mean) / std
    return out
