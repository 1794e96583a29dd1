"""Batches: the plan (which rows each worker sees at each step, fixed before training
starts) and the collate step that turns a micro batch of rows into tensors.

A plan is deterministic (seeded), so a resumed run continues at exactly the same sample:
the step counter alone is the data position. Samples of similar length share a batch
(LLaVA's length grouping), which keeps padding low; the order of batches is shuffled.
"""

from __future__ import annotations

import numpy as np
import torch

from medvl.data.images import normalize
from medvl.data.tokenize import IGNORE


def plan_batches(lengths: np.ndarray, global_batch: int, seed: int, group_by_length: bool,
                 epochs: int = 1) -> np.ndarray:
    """Row indices shaped ``(steps, global_batch)``.

    Rows are padded by wrapping around (as torch's DistributedSampler does) so that every
    worker runs the same number of steps; no row is dropped.
    """
    rng = np.random.default_rng(seed)
    plans = []
    for _ in range(epochs):
        order = rng.permutation(len(lengths))
        pad = (-len(order)) % global_batch
        order = np.concatenate([order, order[:pad]])
        if group_by_length:
            # Megabatches of 32 batches, sorted by length inside, as in LLaVA's sampler.
            mega = global_batch * 32
            chunks = [order[i:i + mega] for i in range(0, len(order), mega)]
            order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks])
        batches = order.reshape(-1, global_batch)
        plans.append(batches[rng.permutation(len(batches))])
    return np.concatenate(plans)


def padding_fraction(lengths: np.ndarray, plan: np.ndarray, per_worker: int) -> float:
    """Share of padded positions when each worker pads its micro batch to its longest row."""
    micro = lengths[plan.reshape(-1, per_worker)]
    return float(1.0 - micro.sum() / (micro.max(axis=1) * per_worker).sum())


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
