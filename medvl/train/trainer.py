"""``medvl train``: one curriculum stage as a Ray Train ``TorchTrainer`` run.

The driver plans the batches, hands each worker its own ordered Ray Dataset and runs
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
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from medvl import storage
from medvl.train.batching import plan_batches
from medvl.train.config import TrainConfig
from medvl.train.loop import STATE_FILE, train_loop_per_worker

URI_FIELDS = ("data", "output", "init", "tokenizer", "vision_tower", "llm")


def read_manifest(data: str) -> dict:
    return json.loads(storage.read_text(storage.join(data, "manifest.json")))


def rank_datasets(cfg: TrainConfig) -> tuple[dict[str, ray.data.Dataset], int]:
    """One dataset per worker, holding exactly its rows of the plan in step order."""
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    fs, path = storage.resolve(storage.join(cfg.data, "shards"))
    index = pq.read_table(path, filesystem=fs, columns=["id", "length"])
    ids, lengths = index["id"].to_pylist(), index["length"].to_numpy()
    plan = plan_batches(lengths, cfg.global_batch, cfg.seed, cfg.group_by_length, cfg.epochs)
    if cfg.max_steps:
        plan = plan[: cfg.max_steps]
    share = cfg.batch_size * cfg.grad_accum
    rows = ray.data.read_parquet(path, filesystem=fs).select_columns(["id", "input_ids", "labels", "pixels"])
    datasets = {}
    for r in range(cfg.num_workers):
        slots: dict[str, list[int]] = {}
        for pos, i in enumerate(plan[:, r * share:(r + 1) * share].ravel()):
            slots.setdefault(ids[i], []).append(pos)
        ds = rows.map_batches(_expand, fn_kwargs={"slots": slots}, batch_format="pyarrow")
        n = len(plan) * share
        # Explicit range boundaries: ~4k rows per sorted block instead of 200 partitions.
        datasets[f"rank{r}"] = ds.sort("order", boundaries=list(range(4096, n, 4096)) or [n])
    return datasets, len(plan)


def _expand(table, slots: dict[str, list[int]]):
    """Each row once per slot it fills in this worker's plan (repeats: padding, epochs)."""
    take, order = [], []
    for i, rid in enumerate(table["id"].to_pylist()):
        for pos in slots.get(rid, ()):
            take.append(i)
            order.append(pos)
    out = table.take(take)
    return out.append_column("order", pa.array(order, pa.int64()))


def train(cfg: TrainConfig) -> dict:
    """Run one stage; return a summary (steps, first/last loss, exported model URI)."""
    for name in ("data", "output"):
        if not getattr(cfg, name):
            raise ValueError(f"train: `{name}` is required")
    cfg = dataclasses.replace(cfg, **{k: storage.absolute(getattr(cfg, k)) for k in URI_FIELDS})
    if not ray.is_initialized():
        ray.init()
    manifest = read_manifest(cfg.data)
    datasets, steps = rank_datasets(cfg)
    fs, path = storage.resolve(cfg.output)
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    pre = manifest["config"]
    hf = storage.join(cfg.output, "hf")
    meta = {"template": pre["template"], "aspect": pre["aspect"], "image_size": pre["image_size"]}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": dataclasses.asdict(cfg), "steps": steps, "hf": hf, "meta": meta},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=cfg.name, storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
        datasets=datasets,
        # Each worker reads only its own dataset, in plan order.
        dataset_config=DataConfig(datasets_to_split=[],
                                  execution_options=ray.data.ExecutionOptions(preserve_order=True)),
    )
    result = trainer.fit()
    return summarize(result.checkpoint, cfg, hf)


def read_state(checkpoint) -> dict:
    """The checkpoint's ``state.json`` alone, read in place (the ZeRO shards stay in storage)."""
    with checkpoint.filesystem.open_input_stream(posixpath.join(checkpoint.path, STATE_FILE)) as f:
        return json.loads(f.read())


def summarize(checkpoint, cfg: TrainConfig, hf: str) -> dict:
    """``metrics.jsonl`` + ``loss.png`` beside ``hf/``; a summary (steps, losses, model URI)."""
    state = read_state(checkpoint)
    history = state["history"]
    storage.write_text(storage.join(cfg.output, "metrics.jsonl"),
                       "".join(json.dumps(h) + "\n" for h in history))
    storage.write_bytes(storage.join(cfg.output, "loss.png"), loss_plot(history, f"stage {cfg.stage}"))
    losses = [h["loss"] for h in history]
    return {"stage": cfg.stage, "steps": state["step"], "first_loss": losses[0], "last_loss": losses[-1],
            "min_loss": float(np.min(losses)), "hf": hf, "resumed_from": state["resumes"],
            "init_projector_sha256": state["init_projector_sha256"]}


def loss_plot(history: list[dict], title: str) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history])
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
