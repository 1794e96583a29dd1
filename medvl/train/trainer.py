"""``medvl train``: one curriculum stage as a Ray Train ``TorchTrainer`` run.

The driver plans the batches from the shard row counts (each worker then streams its own
rows, ``feed.py``) and runs
``fit()`` (restoring from the latest checkpoint after worker failures, or when re-run
with the same ``output`` + ``name`` after a driver crash). The workers write the final HF
model to ``OUTPUT/hf``; the driver never loads weights (it may be a small head node) and
only writes the metrics and the loss curve beside it.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath

import numpy as np
from ray.train import CheckpointConfig, FailureConfig, RunConfig
from ray.train.torch import TorchTrainer

from medvl import config, storage
from medvl.console import MetricsFollower, init_ray
from medvl.placement import Placement, check_accelerator, train_scaling
from medvl.preflight import check_inputs, check_shared_storage
from medvl.rerun import conflict, differences, plain, save_config, saved_config
from medvl.train.checkpoint import STATE_FILE, check_resumable
from medvl.train.config import TrainConfig
from medvl.train.feed import FeedPlan
from medvl.train.loop import train_loop_per_worker
from medvl.train.validation import ValPlan

URI_FIELDS = ("data", "output", "init", "tokenizer", "vision_tower", "llm")


def read_manifest(data: str) -> dict:
    return json.loads(storage.read_text(storage.join(data, "manifest.json")))


def feed_plan(cfg: TrainConfig, manifest: dict) -> FeedPlan:
    """The batch plan, from the manifest's shard row counts alone (no data is read here)."""
    if "shard_rows" not in manifest:
        raise ValueError(f"{cfg.data}: manifest has no shard_rows (written by an older medvl); "
                         "run `medvl preprocess` again")
    return FeedPlan(shards=tuple(storage.join(cfg.data, s) for s in manifest["shards"]),
                    shard_rows=tuple(manifest["shard_rows"]), world=cfg.num_workers,
                    share=cfg.batch_size * cfg.grad_accum, seed=cfg.seed, epochs=cfg.epochs,
                    group_by_length=cfg.group_by_length, max_steps=cfg.max_steps)


def val_plan(cfg: TrainConfig, manifest: dict) -> ValPlan | None:
    """Who holds which held-out rows (``val/`` shards; none from an older manifest or with
    preprocess's ``val_fraction`` 0)."""
    if not manifest.get("val_shards"):
        return None
    return ValPlan(shards=tuple(storage.join(cfg.data, s) for s in manifest["val_shards"]),
                   shard_rows=tuple(manifest["val_shard_rows"]), world=cfg.num_workers, batch_size=cfg.batch_size)


def checked_inputs(cfg: TrainConfig, command: str) -> TrainConfig:
    """``cfg`` with absolute URIs, once its required fields are set and its inputs exist (one
    line and exit 2 otherwise, before Ray starts): what training and its probe both need."""
    for name in ("data", "output"):
        if not getattr(cfg, name):
            raise ValueError(f"{command}: `{name}` is required")
    cfg = dataclasses.replace(cfg, **{k: storage.absolute(getattr(cfg, k)) for k in URI_FIELDS})
    check_inputs({"data": storage.join(cfg.data, "manifest.json"), "init": cfg.init, "tokenizer": cfg.tokenizer,
                  "vision_tower": cfg.vision_tower, "llm": cfg.llm}, outputs=(cfg.output,))
    return cfg


def train(cfg: TrainConfig, placement: Placement | None = None, resume: bool = False,
          overwrite: bool = False) -> dict:
    """Run one stage on the recipe's training nodes; return a summary (steps, first/last loss,
    exported model URI). An output holding a run of another config is an error unless
    ``resume`` (continue it with its saved config) or ``overwrite`` (delete it first)."""
    cfg = claim_output(checked_inputs(cfg, "train"), resume, overwrite)
    init_ray()
    check_shared_storage(cfg.output)  # every node writes there: one storage, or stop now
    placement = placement or Placement()
    if cfg.use_gpu:
        check_accelerator(placement.train_accelerator)
    manifest = read_manifest(cfg.data)
    plan = feed_plan(cfg, manifest)
    fs, path = storage.resolve(cfg.output)
    loop = loop_config(cfg, plan, manifest)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop,
        scaling_config=train_scaling(cfg.num_workers, cfg.use_gpu, cfg.cpus_per_worker,
                                     placement),
        run_config=RunConfig(name=cfg.name, storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
    )
    start = latest_step(cfg)
    if start:
        check_resumable(cfg, start)  # before fit(): no worker loads weights for a checkpoint it cannot load
        print(f"[stage {cfg.stage}] resuming from checkpoint at step {start}", flush=True)
    with MetricsFollower(storage.join(cfg.output, "metrics.jsonl"), cfg.stage, plan.steps, start):
        result = trainer.fit()
    return summarize(result.checkpoint, cfg, loop["hf"])


def loop_config(cfg: TrainConfig, plan: FeedPlan, manifest: dict) -> dict:
    """What every worker's ``train_loop_per_worker`` is given: the stage, its batch plan, who
    holds which val rows (None: no validation), where to export, and the preprocessing facts
    the export records."""
    pre = manifest["config"]
    val = val_plan(cfg, manifest)
    return {"train": dataclasses.asdict(cfg), "plan": dataclasses.asdict(plan), "hf": storage.join(cfg.output, "hf"),
            "val": val and dataclasses.asdict(val),
            "meta": {"template": pre["template"], "aspect": pre["aspect"], "image_size": pre["image_size"]}}


def claim_output(cfg: TrainConfig, resume: bool, overwrite: bool) -> TrainConfig:
    """The config to run with, after the re-run rules (``rerun.py``); saves it in the output."""
    saved = saved_config(cfg.output)
    if saved is not None:
        try:
            before = config.from_dict(TrainConfig, saved)
            diffs = differences(plain(before, True), plain(cfg, True))
        except ValueError:  # written by another medvl version
            before, diffs = None, ["config.yaml: not a config of this medvl version"]
        if diffs and overwrite:
            storage.delete_dir(cfg.output)
        elif diffs and resume and before is not None:
            cfg = before
        elif diffs:
            raise conflict(cfg.output, diffs)
    save_config(cfg.output, cfg)
    return cfg


def latest_step(cfg: TrainConfig) -> int:
    """The step of the newest checkpoint a run of this output + name would restore (0: none)."""
    run = storage.join(cfg.output, cfg.name)
    dirs = sorted({posixpath.dirname(posixpath.relpath(u, run)) for u in storage.list_files(run, STATE_FILE)})
    return int(dirs[-1].rsplit("_", 1)[1]) if dirs and dirs[-1].startswith("checkpoint_") else 0


def read_state(checkpoint) -> dict:
    """The checkpoint's ``state.json`` alone, read in place (the ZeRO shards stay in storage)."""
    with checkpoint.filesystem.open_input_stream(posixpath.join(checkpoint.path, STATE_FILE)) as f:
        return json.loads(f.read())


def summarize(checkpoint, cfg: TrainConfig, hf: str) -> dict:
    """``loss.png`` beside ``hf/`` (rank 0 wrote ``metrics.jsonl``); a summary (steps, losses,
    model URI)."""
    state = read_state(checkpoint)
    history = state["history"]
    storage.write_bytes(storage.join(cfg.output, "loss.png"), loss_plot(history, f"stage {cfg.stage}"))
    losses = [h["loss"] for h in history]
    return {"stage": cfg.stage, "steps": state["step"], "first_loss": losses[0], "last_loss": losses[-1],
            "min_loss": float(np.min(losses)), **val_summary(history), "hf": hf, "resumed_from": state["resumes"],
            "init_projector_sha256": state["init_projector_sha256"]}


def val_summary(history: list[dict]) -> dict:
    """The last and the best validation loss and their steps (None without validation)."""
    val = [h for h in history if h.get("val_loss") is not None]
    best = min(val, key=lambda h: h["val_loss"], default=None)
    return {"last_val_loss": val[-1]["val_loss"] if val else None, "best_val_loss": best and best["val_loss"],
            "best_val_step": best and best["step"]}


def loss_plot(history: list[dict], title: str) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = [h["step"] for h in history], [h["loss"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, alpha=0.3, linewidth=1, label="per step")
    ax.plot(steps, smooth(losses), linewidth=2, label="smoothed (EMA 0.9)")
    val = [(h["step"], h["val_loss"]) for h in history if h.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", linewidth=2, label="validation (held-out rows)")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so the first points
    are not pulled towards zero."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out
