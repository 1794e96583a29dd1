"""The loss plot's smoothing (TensorBoard's debiased EMA)."""

import pytest

from medvl.train.trainer import loss_plot, smooth


def test_smoothing_is_a_debiased_ema():
    assert smooth([3.0, 3.0, 3.0]) == pytest.approx([3.0, 3.0, 3.0])  # no pull towards zero
    assert smooth([0.0, 10.0], weight=0.5) == pytest.approx([0.0, 10 * 0.5 / 0.75])


def test_loss_plot_is_a_png():
    assert loss_plot([{"step": s, "loss": 1.0 / s} for s in range(1, 20)], "stage 1")[:8] == b"\x89PNG\r\n\x1a\n"
