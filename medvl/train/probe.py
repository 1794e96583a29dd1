"""``medvl train --probe``: will the longest batch fit? Asked in a minute, not hours into a run.

The probe runs one worst-case step on the recipe's own workers: Ray Train with the recipe's
placement and worker count, the model built as the training loop builds it (``build_model``),
the DeepSpeed engine of the recipe's ZeRO stage, and one forward, backward and optimizer step
(the step allocates the optimizer state) on ``batch_size`` rows of ``max_length`` tokens, each
with its image, every text position labelled. Each rank then compares its peak with its
capacity: on GPU, ``torch.cuda.max_memory_allocated`` against the device's memory; on CPU the
process's peak resident memory (``medvl.train.memory``) against its share of the node's memory
available when it started. A batch "fits" when its peak stays under ``HEADROOM`` of capacity:
the caching allocator's fragmentation and the collectives' buffers are not in the peak.

``capacity_gib`` replaces the measured capacity (``--probe-capacity-gib``): to size for a
smaller device than the one at hand, or to see the stop the probe gives.
"""

from __future__ import annotations

import dataclasses
import json

import psutil
import ray.train
import torch

from medvl import storage
from medvl.data.tokenize import IGNORE
from medvl.placement import Placement, check_accelerator, train_scaling
from medvl.preflight import check_shared_storage
from medvl.tokenizer import image_token_id
from medvl.train.config import TrainConfig

HEADROOM = 0.9  # share of capacity the measured peak may use
GIB = 2**30


def probe(cfg: TrainConfig, placement: Placement | None = None, capacity_gib: float | None = None) -> dict:
    """Run the worst-case step on the recipe's workers; per-rank peaks and capacities, and
    whether every rank fits. Writes nothing but ``OUTPUT/probe/``."""
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from medvl.console import init_ray
    from medvl.train.trainer import checked_inputs, read_manifest

    cfg = checked_inputs(cfg, "train --probe")
    init_ray()
    out = storage.join(cfg.output, "probe")
    check_shared_storage(cfg.output)  # the ranks write their figures there
    placement = placement or Placement()
    if cfg.use_gpu:
        check_accelerator(placement.train_accelerator)
    storage.delete_dir(out)  # an earlier probe's run and figures
    max_length = read_manifest(cfg.data)["config"]["max_length"]
    fs, path = storage.resolve(out)
    TorchTrainer(
        probe_worker,
        train_loop_config={"train": dataclasses.asdict(cfg), "max_length": max_length, "out": out,
                           "capacity": int(capacity_gib * GIB) if capacity_gib else None},
        scaling_config=train_scaling(cfg.num_workers, cfg.use_gpu, cfg.cpus_per_worker, placement),
        run_config=RunConfig(name="run", storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=0)),
    ).fit()
    ranks = [json.loads(storage.read_text(storage.join(out, f"rank{r}.json"))) for r in range(cfg.num_workers)]
    return {"stage": cfg.stage, "zero_stage": cfg.zero_stage, "batch": [cfg.batch_size, max_length],
            "fits": all(r["fits"] for r in ranks), "ranks": ranks}


def verdict(report: dict) -> str:
    """One line: the worst rank's peak against its capacity."""
    worst = max(report["ranks"], key=lambda r: r["peak"] / r["capacity"])
    b, t = report["batch"]
    what = "out of memory" if worst["oom"] else f"peak {worst['peak'] / GIB:.2f} GiB"
    return (f"stage {report['stage']} worst-case batch {b} x {t} (ZeRO-{report['zero_stage']}): {what} of "
            f"{worst['capacity'] / GIB:.2f} GiB {worst['memory']} on rank {worst['rank']} "
            f"({'fits' if report['fits'] else 'does not fit'}, limit {HEADROOM:.0%})")


def probe_worker(config: dict) -> None:
    """One rank: the training loop's set-up, one worst-case step, its peak against capacity."""
    from medvl.train.batching import model_inputs
    from medvl.train.loss import causal_lm_loss
    from medvl.train.memory import PhasePeaks
    from medvl.train.model import build_model
    from medvl.train.optim import adamw
    from medvl.train.zero import deepspeed_config, initialize

    cfg = TrainConfig(**config["train"])
    ctx = ray.train.get_context()
    capacity = config["capacity"] or device_capacity(cfg.use_gpu, ctx.get_local_world_size())
    memory = PhasePeaks()
    torch.manual_seed(cfg.seed)
    if not cfg.use_gpu:
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    oom = False
    try:
        model, tok = build_model(cfg)
        engine = initialize(model, adamw(model, cfg), None, deepspeed_config(cfg))  # as the loop makes them
        batch = model_inputs(worst_case_batch(model, tok, cfg.batch_size, config["max_length"]), engine.device)
        engine.backward(causal_lm_loss(engine, batch))
        engine.step()
    except torch.OutOfMemoryError:
        oom = True
    memory.mark("probe")
    phase = memory.phases["probe"]
    peak = phase["device_peak"] if cfg.use_gpu else phase["peak"]
    report = {"rank": ctx.get_world_rank(), "memory": "GPU" if cfg.use_gpu else "host RSS",
              "peak": capacity if oom else peak, "capacity": capacity, "oom": oom,
              "fits": not oom and peak <= HEADROOM * capacity}
    memory.write(config["out"], report["rank"])
    storage.write_text(storage.join(config["out"], f"rank{report['rank']}.json"), json.dumps(report))


def device_capacity(use_gpu: bool, workers_here: int) -> int:
    """Bytes one rank may use: its GPU's memory, or on CPU its share of the node's memory
    available now plus what it already holds."""
    if use_gpu:
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return psutil.virtual_memory().available // workers_here + psutil.Process().memory_info().rss


def worst_case_batch(model, tok, rows: int, max_length: int) -> dict[str, torch.Tensor]:
    """``rows`` full-length rows as the collate makes them: BOS, the image's tokens, then text,
    all of it labelled. Full length as preprocessing allows it: ``max_length`` counts the image
    as one token (LLaVA's ``model_max_length``), so a stored row holds ``max_length - 1 + n``
    positions (2623 at 2048 and 576 image tokens, not 2048)."""
    n, vocab = model.config.image_seq_length, model.config.text_config.vocab_size
    special = {image_token_id(tok), tok.pad_token_id}
    text = torch.randint(3, vocab, (rows, max_length - 2))  # + BOS = max_length - 1 text tokens
    filler = min({3, 4, 5} - special)  # a plain token: the pad id may be 3 (the demo tokenizer's is)
    text[torch.isin(text, torch.tensor(sorted(special)))] = filler
    ids = torch.cat([torch.full((rows, 1), tok.bos_token_id or 1), torch.full((rows, n), image_token_id(tok)),
                     text], dim=1)
    labels = ids.clone()
    labels[:, : 1 + n] = IGNORE
    size = model.config.vision_config.image_size
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
            "pixels": torch.randint(0, 256, (rows, size, size, 3), dtype=torch.uint8)}
