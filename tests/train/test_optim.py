"""The LR schedule against hand-checked facts."""

import pytest

from medvl.train.optim import lr_lambda


def test_lr_warms_up_linearly_then_decays_by_cosine_to_zero():
    f = lr_lambda(total=100, warmup_ratio=0.03)  # 3 warm-up steps, as the paper's 3%
    assert [f(0), f(1), f(2)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert f(3) == pytest.approx(1.0)  # cosine starts at its peak
    assert f(3 + 97 // 2) == pytest.approx(0.5, abs=0.02)
    assert f(99) == pytest.approx(0.0, abs=1e-3)
    assert all(f(s) >= f(s + 1) for s in range(3, 99))
