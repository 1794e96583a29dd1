"""The per-worker training loop (runs inside Ray Train workers), nanoGPT-sized.

Each worker reads its own slice of the batch plan from Ray Data, steps a DeepSpeed engine,
and at every checkpoint all ranks save their ZeRO shards (trainable parameters and their
optimizer state only: the frozen towers come back from ``init`` on resume) into one
directory that ``ray.train.report`` hands to storage; rank 0 adds the step counter (the
data position) and the metrics so far, and appends each step's metrics to
``metrics.jsonl`` and TensorBoard as it goes (``tracking.py``; the driver prints them).
After the last step the workers write the HF model themselves (``export.export_hf``).
Saving, uploading and the checkpoint's contents are ``checkpoint.py``'s.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
import ray.train
import torch

from medvl import storage
from medvl.train.batching import model_inputs
from medvl.train.checkpoint import (
    CKPT_TAG,
    STATE_FILE,
    needed_by,
    optimizer_layout,
    remove_unfinished_uploads,
    save_and_report,
)
from medvl.train.collectives import all_reduce_sum, host_group
from medvl.train.config import TrainConfig
from medvl.train.export import export_hf
from medvl.train.feed import FeedCollate, FeedPlan, rank_feed, record_read
from medvl.train.loss import causal_lm_loss
from medvl.train.memory import PhasePeaks, release_free_memory, return_large_frees_at_once
from medvl.train.optim import adamw, lr_lambda
from medvl.train.tracking import Tracker
from medvl.train.validation import ValPlan, load_batches, val_due, validation_loss
from medvl.train.zero import deepspeed_config, initialize


def projector_digest(engine) -> str:
    """sha256 of the projector's full (gathered) fp32 weights: proves the stage hand-off."""
    import deepspeed

    proj = engine.module.model.multi_modal_projector
    with deepspeed.zero.GatheredParameters(list(proj.parameters()), modifier_rank=None):
        h = hashlib.sha256()
        for _, p in sorted(proj.named_parameters()):
            h.update(p.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()


def train_loop_per_worker(config: dict) -> None:
    from medvl.train.model import build_model

    cfg = TrainConfig(**config["train"])
    return_large_frees_at_once()
    memory = PhasePeaks()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    host_group()  # all ranks together, before the long load: the group sync_metrics uses
    torch.manual_seed(cfg.seed)
    if not cfg.use_gpu:  # one intra-op thread per allotted core: no oversubscription
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    model, tok = build_model(cfg)  # train mode, recomputation as the recipe sets it, no KV cache
    release_free_memory()
    memory.mark("load")
    plan = FeedPlan(**config["plan"])
    steps = plan.steps
    opt = adamw(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, cfg.warmup_ratio))
    engine = initialize(model, opt, sched, deepspeed_config(cfg))
    memory.mark("setup")  # under ZeRO-3, the full weights are partitioned here

    start, history, resumes, fetched = 0, [], [], 0
    digest = projector_digest(engine)  # the weights this stage starts from
    ckpt = ray.train.get_checkpoint()
    if ckpt:  # only what this rank loads is fetched, not the whole checkpoint (as_directory)
        with storage.fetched(ckpt.filesystem, ckpt.path, lambda rel: needed_by(rel, rank)) as (d, fetched):
            # Trainable weights, optimizer and scheduler; frozen ones are not in the checkpoint.
            engine.load_checkpoint(d, tag=CKPT_TAG, load_module_strict=False)
            with open(os.path.join(d, STATE_FILE)) as f:
                state = json.load(f)
            start, history = state["step"], state["history"]
            resumes, digest = [*state["resumes"], start], state["init_projector_sha256"]

    tracker = Tracker(cfg.output, rank, start, history)
    collate = FeedCollate(tok.pad_token_id, model.config.vision_config.image_size)
    val = [] if not (config["val"] and cfg.val_every) else load_batches(  # held-out rows, on the host
        ValPlan(**config["val"]), rank, tok.pad_token_id, model.config.vision_config.image_size)
    t_feed = time.perf_counter()
    # Starts at the data position: nothing trained is read again.
    micro = iter(rank_feed(plan, rank, start).iter_torch_batches(
        batch_size=cfg.batch_size, prefetch_batches=2, collate_fn=collate) if start < steps else ())
    feed = {"start_step": start, "rows": (steps - start) * plan.share, "read_bytes": 0, "read_nodes": [],
            "node": ray.get_runtime_context().get_node_id(),  # read_nodes: where its read tasks ran
            "resume_bytes": fetched,  # of the checkpoint it resumed from
            "checkpoints": []}  # per save: seconds the loop stood still (wait, save, report)
    prefix = remove_unfinished_uploads(cfg, rank)
    uploading = None  # the local directory of the checkpoint Ray is uploading
    pending: list[dict] = []  # this rank's metrics since the last sync
    for step in range(start, steps):
        t0 = time.perf_counter()
        wait = tokens = padded = 0.0
        losses = []
        for _ in range(cfg.grad_accum):
            tw = time.perf_counter()
            batch = next(micro)
            wait += time.perf_counter() - tw
            feed.setdefault("first_batch_s", time.perf_counter() - t_feed)
            expect = (step * cfg.grad_accum + len(losses)) * cfg.batch_size
            order = batch.pop("order")
            if order[0].item() != expect:  # the plan is the data position: never drift
                raise RuntimeError(f"rank {rank}: batch starts at plan row {order[0].item()}, expected {expect}")
            record_read(feed, batch)
            batch = model_inputs(batch, engine.device)
            tokens += batch["attention_mask"].sum().item()
            padded += batch["attention_mask"].numel()
            loss = causal_lm_loss(engine, batch)  # the head only where labelled, in chunks
            memory.mark_first("forward")
            engine.backward(loss)
            memory.mark_first("backward")
            engine.step()
            memory.mark_first("step")
            losses.append(loss.item())
        dt = time.perf_counter() - t0
        norm = engine.get_global_grad_norm()  # before clipping, over all ranks' gradients
        pending.append({"step": step + 1, "loss": float(np.mean(losses)), "tokens": tokens, "padded": padded,
                        "lr": float(sched.get_last_lr()[0]), "step_s": dt, "data_wait": wait / dt,
                        "time": time.time(),  # when the step ended: loss against wall-clock time
                        "grad_norm": None if norm is None else float(norm)})
        last = step + 1 == steps
        save = last or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0)
        validate = bool(val) and val_due(cfg.val_every, step + 1, steps, save)
        if validate:  # every rank, same steps: a collective pass
            pending[-1]["val_loss"] = validation_loss(engine, val)
        if save or validate or (step + 1) % cfg.log_every == 0:  # rank 0 tracks; the driver prints
            records = sync_metrics(pending, world)  # one collective per window, not per step
            history += records
            tracker.log(records, history)
            pending = []
        if save:
            state = {"step": step + 1, "history": history, "resumes": resumes, "init_projector_sha256": digest,
                     "optimizer_layout": optimizer_layout(cfg)}
            memory.mark_first("to checkpoint")
            uploading, stall = save_and_report(engine, state, uploading, prefix, cfg.upload_timeout_s)
            memory.mark_first("checkpoint")
            feed["checkpoints"].append({"step": step + 1, **stall})
            tracker.sync()
    memory.mark("train")
    storage.write_text(storage.join(cfg.output, "feed", f"rank{rank}.json"), json.dumps(feed))
    lora = (cfg.lora_r, cfg.lora_alpha) if cfg.lora_r else None
    export_hf(engine.module, tok, config["hf"], rank, config["meta"], cfg.max_shard_mb * 10**6, lora)
    memory.mark("export")
    memory.write(cfg.output, rank)
    tracker.close()


def sync_metrics(pending: list[dict], world: int) -> list[dict]:
    """Per-step records of this rank -> global ones (mean loss, summed tokens), in one all_reduce."""
    sums = all_reduce_sum([[p["loss"], p["tokens"], p["padded"]] for p in pending])
    return [{"step": p["step"], "loss": loss / world, "lr": p["lr"], "grad_norm": p["grad_norm"],
             "tokens_per_s": tokens / p["step_s"], "step_s": p["step_s"], "padding": 1 - tokens / padded,
             "data_wait": p["data_wait"], "time": p["time"], **{k: p[k] for k in ("val_loss",) if k in p}}
            for p, (loss, tokens, padded) in zip(pending, sums, strict=True)]
