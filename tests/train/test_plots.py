"""The loss plot's smoothing (TensorBoard's debiased EMA)."""

import pytest

from medvl.train.trainer import loss_plot, smooth, val_summary


def test_smoothing_is_a_debiased_ema():
    assert smooth([3.0, 3.0, 3.0]) == pytest.approx([3.0, 3.0, 3.0])  # no pull towards zero
    assert smooth([0.0, 10.0], weight=0.5) == pytest.approx([0.0, 10 * 0.5 / 0.75])


def test_loss_plot_is_a_png():
    assert loss_plot([{"step": s, "loss": 1.0 / s} for s in range(1, 20)], "stage 1")[:8] == b"\x89PNG\r\n\x1a\n"


def test_val_summary_has_the_last_and_the_best_validation():
    history = [{"step": s, "loss": 1.0, **({"val_loss": v} if v else {})} for s, v in enumerate([0, 3.0, 0, 2.0, 2.5], 1)]
    assert val_summary(history) == {"last_val_loss": 2.5, "best_val_loss": 2.0, "best_val_step": 4}
    assert val_summary(history[:1]) == {"last_val_loss": None, "best_val_loss": None, "best_val_step": None}
    assert loss_plot(history, "stage 2")[:8] == b"\x89PNG\r\n\x1a\n"  # with the validation points
