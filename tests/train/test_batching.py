"""Micro batches: padding accounting and the pixels the model sees."""

import numpy as np
import pytest
import torch

from medvl.data.images import normalize
from medvl.train.batching import collate, model_inputs, padding_fraction


def test_padding_fraction_by_hand():
    lengths = np.array([4, 2, 3, 3])
    # micro batches [4, 2] and [3, 3]: padded to 4 and 3 -> 14 slots, 12 real tokens
    assert padding_fraction(lengths, np.array([0, 1, 2, 3]), 2) == pytest.approx(2 / 14)


def test_model_inputs_normalise_exactly_as_serving_does():
    """The feed ships uint8 pixels; the model must see what ``images.normalize`` gives serving."""
    pix = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    rows = {"input_ids": [[1, 2, 3], [4]], "labels": [[1, 2, 3], [4]], "pixels": [p.tobytes() for p in pix]}
    batch = collate(rows, 0, 8)
    assert batch["pixels"].dtype == torch.uint8
    out = model_inputs(batch, "cpu")
    assert torch.equal(out["pixel_values"], torch.from_numpy(normalize(pix)))
    assert out["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]] and out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
