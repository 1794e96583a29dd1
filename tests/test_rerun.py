"""The re-run rules' pieces: which fields count, how differences are named."""

from medvl.rerun import conflict, differences, plain
from medvl.train.config import TrainConfig


def test_fields_that_do_not_change_the_result_are_not_a_conflict():
    a = TrainConfig(lr=1e-3, log_every=10)
    assert differences(plain(a, True), plain(TrainConfig(lr=1e-3, log_every=50), True)) == []
    assert differences(plain(a, True), plain(TrainConfig(lr=2e-5), True)) == ["lr: 0.001 -> 2e-05"]
    assert "log_every" in plain(a)  # the saved config.yaml keeps every field


def test_conflict_is_one_line_naming_fields_and_both_ways_on():
    diffs = [f"f{i}: 0 -> 1" for i in range(6)]
    msg = str(conflict("runs/x/stage2", diffs))
    assert "\n" not in msg and "f0: 0 -> 1" in msg and "and 2 more" in msg
    assert "--resume" in msg and "--overwrite" in msg
