"""The re-run rules' pieces: which fields count, how differences are named."""

import pytest

from medvl.rerun import conflict, differences, plain, save_config
from medvl.train.config import TrainConfig
from medvl.train.trainer import claim_output


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


def test_train_output_rules_resume_keeps_the_saved_config_overwrite_deletes(tmp_path):
    out = str(tmp_path / "stage1")
    saved = TrainConfig(data="d", output=out, lr=1e-3)
    save_config(out, saved)
    (tmp_path / "stage1" / "checkpoint.bin").write_text("a checkpoint")
    new = TrainConfig(data="d", output=out, lr=2e-2)
    with pytest.raises(ValueError, match=r"lr: 0.001 -> 0.02"):
        claim_output(new, resume=False, overwrite=False)
    assert claim_output(new, resume=True, overwrite=False) == saved
    assert (tmp_path / "stage1" / "checkpoint.bin").exists()
    assert claim_output(new, resume=False, overwrite=True) == new
    assert not (tmp_path / "stage1" / "checkpoint.bin").exists()
    assert claim_output(TrainConfig(data="d", output=out, lr=2e-2, log_every=1), False, False).log_every == 1
