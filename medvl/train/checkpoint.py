"""Checkpoints of a training run: what goes in them, how they are saved and uploaded, and
whether the current run can load the one it would resume from.

Every rank saves its ZeRO shards into one local directory that ``ray.train.report`` uploads
in Ray's background thread; rank 0 adds ``state.json`` (the step, the metrics so far, and
the optimizer-state layout that DeepSpeed needs unchanged to load the shards back).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
import time

import ray.train

from medvl import storage
from medvl.train.config import TrainConfig

CKPT_TAG = "ckpt"
STATE_FILE = "state.json"  # step (= data position), metrics and optimizer layout, written by rank 0
RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")  # DeepSpeed's per-rank partition files
# What medvl checkpoints before the layout was recorded were saved with: DeepSpeed's own
# default sub-groups (``DeepSpeedZeroConfig.sub_group_size``), the recipe's zero3.json value.
LEGACY_SUB_GROUP = 10**9
LOG_AFTER_S = 60.0  # first "still waiting for the upload" line; then at 2x, 4x, ... the wait


def dir_name(step: int) -> str:
    """The name of the checkpoint directory of ``step`` in the run's storage."""
    return f"checkpoint_{step:06d}"


def optimizer_layout(cfg: TrainConfig) -> dict:
    """The settings that fix how DeepSpeed lays out the optimizer state in the shards, by
    config field: the ZeRO stage (which partitioner, which files), the world size (each
    rank's partition of every flat group) and, under ZeRO-3, the sub-group size (one fp32
    flat tensor per sub-group: torch's ``Optimizer.load_state_dict`` rejects another count).
    Which parameters train (``stage``, ``lora_r``) is fixed by the saved config (``rerun.py``)."""
    return {"zero_stage": cfg.zero_stage, "num_workers": cfg.num_workers,
            "zero_sub_group_size": cfg.zero_sub_group_size if cfg.zero_stage == 3 else None}


def saved_layout(state: dict, cfg: TrainConfig) -> dict:
    """The layout a checkpoint was saved with; one written before it was recorded had the
    saved config's stage and workers (``rerun.py`` checked them) and DeepSpeed's sub-groups."""
    if "optimizer_layout" in state:
        return state["optimizer_layout"]
    return optimizer_layout(cfg) | ({"zero_sub_group_size": LEGACY_SUB_GROUP} if cfg.zero_stage == 3 else {})


def check_resumable(cfg: TrainConfig, step: int) -> None:
    """Stop, before any worker loads weights, if the checkpoint of ``step`` this run would
    resume from was saved with another optimizer layout: DeepSpeed fails deep inside
    ``load_checkpoint`` on every rank, and Ray retries it ``max_failures`` times. Reads
    ``state.json`` alone (the step's metrics: kilobytes), not the shards."""
    where = storage.join(cfg.output, cfg.name, dir_name(step))
    state = json.loads(storage.read_text(storage.join(where, STATE_FILE)))
    old, new = saved_layout(state, cfg), optimizer_layout(cfg)
    diffs = [k for k in new if old.get(k) != new[k]]
    if diffs:
        shown = "; ".join(f"{k} {old.get(k)} -> {new[k]}" for k in diffs)
        raise ValueError(f"{where}: saved with another optimizer layout ({shown}), which DeepSpeed cannot load: "
                         f"resume with {diffs[0]}: {old.get(diffs[0])}, or start the stage afresh with another `name`")


def needed_by(rel: str, rank: int) -> bool:
    """Whether ``rank`` loads checkpoint file ``rel``: the common files and its own ZeRO
    partitions (DeepSpeed opens no other rank's unless ``elastic_checkpoint``, off here)."""
    m = RANK_FILE.search(posixpath.basename(rel))
    return m is None or int(m[1]) == rank


def upload_prefix(cfg: TrainConfig, rank: int) -> str:
    """The name prefix of this run's and rank's local checkpoint directories (in ``TMPDIR``):
    the run's storage URI is in it, so another run on the node keeps its own."""
    run = hashlib.sha256(storage.join(cfg.output, cfg.name).encode()).hexdigest()[:12]
    return f"medvl-ckpt-{run}-r{rank}-"


def remove_unfinished_uploads(cfg: TrainConfig, rank: int) -> str:
    """Remove the local checkpoint directories a killed attempt of this run and rank left
    (Ray deletes one only once uploaded; at 13B each is ~20 GB of the node's disk); return
    the prefix for new ones."""
    prefix = upload_prefix(cfg, rank)
    for d in glob.glob(os.path.join(tempfile.gettempdir(), glob.escape(prefix) + "*")):
        shutil.rmtree(d, ignore_errors=True)
    return prefix


def save_and_report(engine, state: dict, previous: str | None, prefix: str,
                    upload_timeout_s: float) -> tuple[str, dict[str, float]]:
    """All ranks save their ZeRO shards (frozen parameters excluded); rank 0 adds the state;
    all report the same directory name, so Ray merges the shards into one checkpoint.

    The upload runs in Ray's background thread (``CheckpointUploadMode.ASYNC``): the next
    steps start while the shards upload (at 13B, ~20 GB per rank, minutes to S3), and Ray
    deletes the local directory once it is uploaded, and flushes the last upload before the
    run ends. Ray only records a checkpoint once every rank's upload is done, so a restart
    resumes from a complete one. Before writing, wait until the ``previous`` checkpoint's
    directory is gone (uploaded): one checkpoint per rank on local disk (``TMPDIR``), not
    a queue of them when uploads are slower than ``checkpoint_every``. Returns the directory
    and the seconds spent waiting for the previous upload, saving, and in ``report``."""
    t = [time.perf_counter()]
    wait_uploaded(previous, upload_timeout_s)
    t.append(time.perf_counter())
    tmp = tempfile.mkdtemp(prefix=prefix)  # removed by Ray after the upload
    engine.save_checkpoint(tmp, tag=CKPT_TAG, exclude_frozen_parameters=True)
    if ray.train.get_context().get_world_rank() == 0:
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump(state, f)
    t.append(time.perf_counter())
    metrics = {**state["history"][-1], "step": state["step"]}
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                     checkpoint_dir_name=dir_name(state["step"]),
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                     delete_local_checkpoint_after_upload=True)
    t.append(time.perf_counter())
    return tmp, {k: b - a for k, a, b in zip(("wait_s", "save_s", "report_s"), t[:-1], t[1:], strict=True)}


def wait_uploaded(local: str | None, timeout_s: float, poll_s: float = 0.5) -> None:
    """Block until Ray's upload thread has uploaded and deleted ``local``, at most
    ``timeout_s``. A failed upload ends the run from that thread, but a failed delete is
    only logged by Ray and a stalled transfer may never end: without a deadline this rank
    would sleep while the others sit in ``save_checkpoint``'s collectives until their
    timeout names the wrong place. The error ends this attempt; Ray restarts from the last
    complete checkpoint, and the restarted rank removes the directory
    (``remove_unfinished_uploads``). Says how long it has waited at 1, 2, 4, ... minutes."""
    t0, next_log = time.monotonic(), LOG_AFTER_S
    while local and os.path.exists(local):
        waited = time.monotonic() - t0
        if waited >= timeout_s:
            raise TimeoutError(f"checkpoint directory {local} still exists after {waited:.0f} s "
                               f"(upload_timeout_s {timeout_s:g}; raise it for uploads this slow): its upload "
                               "stalled or Ray could not delete it; ending this attempt, Ray restarts from the "
                               "last complete checkpoint")
        if waited >= next_log:
            print(f"still waiting for the upload of {local} after {waited:.0f} s "
                  f"(upload_timeout_s {timeout_s:g})", flush=True)
            next_log *= 2
        time.sleep(poll_s)
