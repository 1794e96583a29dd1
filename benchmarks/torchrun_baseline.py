"""What LLaVA / Qilin-Med-VL users run instead of Ray: the same model and DeepSpeed config,
launched by torchrun (gloo here), fed by a torch ``DataLoader`` over the same shards in
the same plan order. ``benchmarks/train.py`` starts it and compares step times.

HF ``Trainer`` is not used: on this CPU its DeepSpeed path wants DeepSpeed's own CPU Adam
(a JIT-compiled op, minutes of build), which the Ray loop does not use either; this is the
plain DeepSpeed loop LLaVA's ``train.py`` reduces to, with our exact building blocks.

Usage: torchrun --nproc_per_node 2 benchmarks/torchrun_baseline.py CONFIG_JSON STEPS WARMUP OUT_JSON
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from functools import partial

import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from medvl.train.batching import collate, model_inputs
from medvl.train.config import TrainConfig
from medvl.train.feed import plan_rows
from medvl.train.memory import return_large_frees_at_once
from medvl.train.model import build_model
from medvl.train.optim import adamw, lr_lambda
from medvl.train.trainer import feed_plan, read_manifest
from medvl.train.zero import deepspeed_config, initialize

COLUMNS = ("input_ids", "labels", "pixels")


class PlannedRows(Dataset):
    """This rank's rows in plan order (what a DistributedSampler with our plan would yield)."""

    def __init__(self, rows: dict[str, list], order):
        self.rows, self.order = rows, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict:
        return {k: self.rows[k][self.order[i]] for k in COLUMNS}


def collate_rows(items: list[dict], pad_id: int, image_size: int) -> dict:
    return collate({k: [it[k] for it in items] for k in COLUMNS}, pad_id, image_size)


def main() -> None:
    with open(sys.argv[1]) as f:
        cfg = TrainConfig(**json.load(f))
    steps, warmup, out = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))  # as the Ray workers run
    return_large_frees_at_once()  # the Ray loop's allocator policy: the same per-step work
    model, tok = build_model(cfg)
    opt = adamw(model, cfg)  # the optimizer the Ray loop runs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, cfg.warmup_ratio))
    engine = initialize(model, opt, sched, deepspeed_config(cfg))
    table = pq.read_table(f"{cfg.data}/shards", columns=[*COLUMNS, "length"])
    plan = feed_plan(dataclasses.replace(cfg, max_steps=steps), read_manifest(cfg.data))
    order = plan_rows(plan, rank, table["length"].to_numpy())  # the rows the Ray feed gives this rank
    rows = table.select(list(COLUMNS)).to_pydict()
    loader = DataLoader(PlannedRows(rows, order), batch_size=cfg.batch_size, num_workers=1, prefetch_factor=2,
                        collate_fn=partial(collate_rows, pad_id=tok.pad_token_id,
                                           image_size=model.config.vision_config.image_size))
    micro = iter(loader)
    times, ends = [], []
    for _ in range(plan.steps):
        t0 = time.perf_counter()
        for _ in range(cfg.grad_accum):
            loss = engine(**model_inputs(next(micro), "cpu")).loss
            engine.backward(loss)
            engine.step()
            loss.item()  # the Ray loop logs every step's loss too
        times.append(time.perf_counter() - t0)
        ends.append(time.time())
    if rank == 0:  # window: wall-clock time from the end of warm-up to the last step
        with open(out, "w") as f:
            json.dump({"step_s": statistics.median(times[warmup:]), "steps": len(times),
                       "window": [ends[warmup - 1], ends[-1]]}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
