"""Checkpoints that cannot be loaded or uploaded stop in one clear line instead of failing
deep inside DeepSpeed (and Ray's retries), or hanging a rank while the others wait in a
collective until its timeout."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
import time

import pytest

from medvl.train.checkpoint import check_resumable, dir_name, optimizer_layout, wait_uploaded
from medvl.train.config import TrainConfig
from medvl.train.trainer import train


def _state(tmp_path, cfg: TrainConfig, step: int, **state) -> None:
    """A checkpoint's ``state.json`` where ``train`` looks for it (the shards are not read)."""
    d = tmp_path / cfg.name / dir_name(step)
    d.mkdir(parents=True)
    (d / "state.json").write_text(json.dumps({"step": step, "history": [], **state}))


def test_a_checkpoint_from_before_the_layout_was_recorded_has_deepspeeds_sub_groups(tmp_path):
    cfg = TrainConfig(output=str(tmp_path), name="old", zero_stage=3)
    _state(tmp_path, cfg, 4)
    with pytest.raises(ValueError, match=r"zero_sub_group_size 1000000000 -> 10000000\).*resume with "
                                         r"zero_sub_group_size: 1000000000, or start the stage afresh"):
        check_resumable(cfg, 4)
    check_resumable(dataclasses.replace(cfg, zero_sub_group_size=10**9), 4)  # the old setting resumes
    check_resumable(dataclasses.replace(cfg, zero_stage=2), 4)  # ZeRO-2 has no sub-groups


def test_a_recorded_layout_is_compared_setting_by_setting(tmp_path):
    cfg = TrainConfig(output=str(tmp_path), name="rec", zero_stage=3, num_workers=2)
    _state(tmp_path, cfg, 2, optimizer_layout=optimizer_layout(cfg))
    check_resumable(cfg, 2)
    with pytest.raises(ValueError, match=r"\(num_workers 2 -> 4\).*resume with num_workers: 2") as e:
        check_resumable(dataclasses.replace(cfg, num_workers=4), 2)
    assert "\n" not in str(e.value)


@pytest.mark.timeout(30)  # before the deadline existed this waited forever
def test_an_upload_directory_that_never_goes_away_fails_the_wait_naming_it(tmp_path):
    """Ray only logs a failed delete after the upload, and a stalled transfer may not end."""
    stuck = tmp_path / "medvl-ckpt-stuck"
    stuck.mkdir()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=re.escape(f"{stuck} still exists after 2 s")):
        wait_uploaded(str(stuck), 2, poll_s=0.1)
    assert time.monotonic() - t0 < 10


@pytest.mark.timeout(30)
def test_the_wait_ends_when_ray_deletes_the_directory(tmp_path):
    uploading = tmp_path / "medvl-ckpt-up"
    uploading.mkdir()
    threading.Timer(0.5, os.rmdir, args=(uploading,)).start()
    wait_uploaded(str(uploading), 20, poll_s=0.1)
    assert not uploading.exists()


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_resuming_with_another_sub_group_size_stops_before_the_workers(demo_shards, demo_dir, tmp_path):
    """A ZeRO-3 checkpoint with 1000-element sub-groups (several per rank here) resumed with the
    default's one: DeepSpeed's load fails on every rank (torch: "loaded state dict contains a
    parameter group that doesn't match the size of optimizer's group"), Ray retries it. Now a
    ValueError from the driver, before ``fit()`` (a worker's error would come as Ray's)."""
    cfg = TrainConfig(stage=2, data=str(demo_shards / "in"), output=str(tmp_path / "sg"), name="sg",
                      tokenizer=str(demo_dir / "tokenizer"), batch_size=4, zero_stage=3, max_steps=2,
                      zero_sub_group_size=1000, max_failures=0, log_every=100)
    assert train(cfg)["steps"] == 2
    with pytest.raises(ValueError, match=r"saved with another optimizer layout \(zero_sub_group_size 1000 -> "
                                         r"10000000\).*resume with zero_sub_group_size: 1000"):
        train(dataclasses.replace(cfg, zero_sub_group_size=10**7))
