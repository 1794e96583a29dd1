"""Micro batches: the collate step that turns rows into tensors, and the padding it costs.

Which rows form each batch is the feed's plan (``feed.py``).
"""

from __future__ import annotations

import numpy as np
import torch

from medvl.data.images import normalize
from medvl.data.tokenize import IGNORE


def padding_fraction(lengths: np.ndarray, rows: np.ndarray, micro: int) -> float:
    """Share of padded positions when rows, in feed order, form micro batches of ``micro``
    rows each padded to its longest row."""
    batches = lengths[rows[: len(rows) // micro * micro].reshape(-1, micro)]
    return float(1.0 - batches.sum() / (batches.max(axis=1) * micro).sum())


def collate(batch: dict, pad_id: int, image_size: int) -> dict[str, torch.Tensor]:
    """Right-pad one micro batch; pixels from uint8 bytes to normalised float once, here."""
    ids, labels = batch["input_ids"], batch["labels"]
    width = max(len(x) for x in ids)
    out_ids = np.full((len(ids), width), pad_id, np.int64)
    out_labels = np.full((len(ids), width), IGNORE, np.int64)
    mask = np.zeros((len(ids), width), np.int64)
    for i, (x, y) in enumerate(zip(ids, labels, strict=True)):
        out_ids[i, : len(x)], out_labels[i, : len(y)], mask[i, : len(x)] = x, y, 1
    pix = np.stack([np.frombuffer(p, np.uint8).reshape(image_size, image_size, 3) for p in batch["pixels"]])
    return {"input_ids": torch.from_numpy(out_ids), "labels": torch.from_numpy(out_labels),
            "attention_mask": torch.from_numpy(mask), "pixel_values": torch.from_numpy(normalize(pix))}
