"""The batch plan (the data position of every step) and the LR schedule, against hand-checked facts."""

import math

import numpy as np
import pytest

from medvl.train.batching import padding_fraction, plan_batches
from medvl.train.optim import lr_lambda


def test_plan_covers_every_row_once_per_epoch_padding_by_wrap_around():
    lengths = np.arange(10, 113)  # 103 rows: not a multiple of the global batch
    plan = plan_batches(lengths, global_batch=8, seed=1, group_by_length=True, epochs=2)
    assert plan.shape == (2 * math.ceil(103 / 8), 8)
    for epoch in np.split(plan, 2):
        rows, counts = np.unique(epoch, return_counts=True)
        assert len(rows) == 103  # nothing dropped
        assert counts.sum() - 103 == (-103) % 8 and counts.max() == 2  # only the wrap-around repeats
    assert not np.array_equal(plan[:13], plan[13:])  # each epoch shuffled anew


def test_plan_is_deterministic_and_seeded():
    lengths = np.random.default_rng(0).integers(50, 600, 500)
    a = plan_batches(lengths, 16, seed=3, group_by_length=True)
    assert np.array_equal(a, plan_batches(lengths, 16, seed=3, group_by_length=True))
    assert not np.array_equal(a, plan_batches(lengths, 16, seed=4, group_by_length=True))


def test_length_grouping_cuts_padding():
    lengths = np.random.default_rng(0).lognormal(5, 0.8, 4096).astype(int) + 1
    grouped = padding_fraction(lengths, plan_batches(lengths, 32, 0, True), per_worker=8)
    random = padding_fraction(lengths, plan_batches(lengths, 32, 0, False), per_worker=8)
    assert grouped < random / 3


def test_padding_fraction_by_hand():
    lengths = np.array([4, 2, 3, 3])
    # micro batches [4, 2] and [3, 3]: padded to 4 and 3 -> 14 slots, 12 real tokens
    assert padding_fraction(lengths, np.array([[0, 1, 2, 3]]), per_worker=2) == pytest.approx(2 / 14)


def test_lr_warms_up_linearly_then_decays_by_cosine_to_zero():
    f = lr_lambda(total=100, warmup_ratio=0.03)  # 3 warm-up steps, as the paper's 3%
    assert [f(0), f(1), f(2)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert f(3) == pytest.approx(1.0)  # cosine starts at its peak
    assert f(3 + 97 // 2) == pytest.approx(0.5, abs=0.02)
    assert f(99) == pytest.approx(0.0, abs=1e-3)
    assert all(f(s) >= f(s + 1) for s in range(3, 99))
