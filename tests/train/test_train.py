"""Two-stage curriculum on 2 CPU workers (gloo, DeepSpeed ZeRO-2 then ZeRO-3), real Ray Train."""

import hashlib
import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest
import torch

from medvl import storage
from medvl.model.build import build_tiny, load_hf
from medvl.serving.engine import Engine, Request
from medvl.tokenizer import load as load_tokenizer
from medvl.train.config import TrainConfig
from medvl.train.trainer import train
from tests.conftest import stage1_cfg, stage2_cfg

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]


def _falls(summary_losses: list[float]) -> bool:
    return np.mean(summary_losses[-5:]) < np.mean(summary_losses[:5]) - 0.2


def _losses(output: str) -> list[float]:
    import json

    text = storage.read_text(storage.join(output, "metrics.jsonl"))
    return [json.loads(x)["loss"] for x in text.splitlines()]


def projector_sha(model) -> str:
    h = hashlib.sha256()
    for _, p in sorted(model.model.multi_modal_projector.named_parameters()):
        h.update(p.detach().float().numpy().tobytes())
    return h.hexdigest()


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def test_stage1_trains_only_the_projector(stage1, demo_dir):
    out = os.path.dirname(stage1["hf"])
    assert stage1["steps"] == len(_losses(out)) and _falls(_losses(out))
    assert storage.exists(storage.join(out, "loss.png"))
    trained = load_hf(stage1["hf"])
    # Checkpoints hold the projector and its optimizer state, not the frozen LLM.
    llm_bytes = sum(p.numel() * p.element_size() for p in trained.model.language_model.parameters())
    ckpts = [os.path.join(out, "stage1", d) for d in os.listdir(os.path.join(out, "stage1"))
             if d.startswith("checkpoint_")]
    assert ckpts and all(_dir_bytes(c) < llm_bytes / 2 for c in ckpts)
    initial = build_tiny(load_tokenizer(str(demo_dir / "tokenizer")), seed=0)
    frozen = [n for n, _ in initial.named_parameters() if "multi_modal_projector" not in n]
    before, after = dict(initial.named_parameters()), dict(trained.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert not torch.equal(before["model.multi_modal_projector.linear_1.weight"],
                           after["model.multi_modal_projector.linear_1.weight"])


def test_tracking_metrics_tensorboard_logs_and_config_beside_the_run(stage1):
    """rank 0's metrics.jsonl (one record per step, with grad norm), TensorBoard event files
    that TensorBoard's own reader opens with the expected tags and the same values, one
    log file per rank, the resolved config."""
    import json

    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = os.path.dirname(stage1["hf"])
    records = [json.loads(x) for x in storage.read_text(storage.join(out, "metrics.jsonl")).splitlines()]
    assert [r["step"] for r in records] == list(range(1, stage1["steps"] + 1))
    assert all(r["grad_norm"] > 0 for r in records)
    events = EventAccumulator(os.path.join(out, "tensorboard"))
    events.Reload()
    tags = {f"train/{t}" for t in ("loss", "lr", "grad_norm", "tokens_per_s", "padding", "data_wait")}
    assert tags <= set(events.Tags()["scalars"])
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in records]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert {f"rank{r}.log" for r in range(2)} <= set(os.listdir(os.path.join(out, "logs")))
    saved = yaml.safe_load(storage.read_text(storage.join(out, "config.yaml")))
    assert saved["lr"] == 1e-2 and saved["output"] == out


def test_a_different_config_into_the_same_output_stops_with_the_fields(stage1, demo_shards, demo_dir):
    """Before any Ray work: the old run is neither resumed with the new config nor deleted."""
    out = os.path.dirname(stage1["hf"])
    with pytest.raises(ValueError, match=r"lr: 0.01 -> 0.02.*--resume.*--overwrite"):
        train(stage1_cfg(demo_shards, demo_dir, out, "stage1", lr=2e-2))
    assert storage.exists(storage.join(out, "hf", "config.json"))


def _feed(output: str, rank: int) -> dict:
    import json

    return json.loads(storage.read_text(storage.join(output, "feed", f"rank{rank}.json")))


def test_each_rank_reads_only_its_share_of_the_shards(stage1, demo_shards):
    """Two ranks, three epochs: each rank's byte counter holds about half of what the
    epochs span, not all of it (every rank read every shard before the per-rank feed)."""
    out = os.path.dirname(stage1["hf"])
    corpus = _dir_bytes(str(demo_shards / "al" / "shards")) * 3  # epochs=3
    feeds = [_feed(out, r) for r in range(2)]
    assert all(f["start_step"] == 0 and f["rows"] == stage1["steps"] * 4 for f in feeds)
    for f in feeds:
        assert 0.3 * corpus < f["read_bytes"] < 0.7 * corpus, (f, corpus)


def test_grad_accum_trains_on_the_same_rows_per_step(stage1, demo_shards, demo_dir, tmp_path):
    """2 micro batches of 2 per step read the rows 1 batch of 4 does (the plan depends on rows
    per step only): same tokens every step; a wrong micro-batch data position would fail
    the loop's order check or change the counts."""
    import json

    out = str(tmp_path / "accum")
    train(stage1_cfg(demo_shards, demo_dir, out, "accum", batch_size=2, grad_accum=2, max_steps=6))
    history = [json.loads(x) for x in storage.read_text(storage.join(out, "metrics.jsonl")).splitlines()]
    ref = [json.loads(x) for x in storage.read_text(
        storage.join(os.path.dirname(stage1["hf"]), "metrics.jsonl")).splitlines()][:6]
    assert len(history) == 6
    for a, b in zip(history, ref, strict=True):
        assert a["tokens_per_s"] * a["step_s"] == pytest.approx(b["tokens_per_s"] * b["step_s"], rel=1e-6)


def test_stage2_starts_from_stage1_and_exports_a_working_model(stage1, stage2):
    # The projector stage 2 started from is stage 1's final projector, bit for bit (ZeRO-3).
    assert stage2["init_projector_sha256"] == projector_sha(load_hf(stage1["hf"]))
    assert _falls(_losses(os.path.dirname(stage2["hf"])))
    s2 = stage2
    # The export opens in plain transformers (no DeepSpeed) and generates.
    engine = Engine(s2["hf"])
    req = Request(turns=[("<image>\n这是什么检查？", None)], image=_png_bytes(), max_tokens=8)
    steps = list(engine.generate_batch([engine.prepare(req)]))
    assert steps and any(c is not None and c.result is not None for step in steps for c in step)


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (90, 90, 90)).save(buf, "PNG")
    return buf.getvalue()


class WorkerKiller(threading.Thread):
    """SIGKILLs one Ray Train worker of *this* test's run once it has a checkpoint.

    Only descendants of this process are candidates (ray.init started the cluster here),
    so nobody else's Ray on the machine is touched. ``killed`` holds the pid, or stays None
    with ``why`` saying why, so tests can assert that the kill landed.
    """

    def __init__(self, output: str, name: str):
        super().__init__(daemon=True)
        self.snapshot = storage.join(output, name, "checkpoint_manager_snapshot.json")
        self.killed: int | None = None
        self.why = "no checkpoint within 300 s"
        self.start()

    def run(self):
        deadline = time.time() + 300
        while time.time() < deadline and not storage.exists(self.snapshot):
            time.sleep(0.1)
        ours = [p for p in psutil.Process().children(recursive=True) if _is_train_worker(p)]
        if not ours:
            self.why = "no live RayTrainWorker below this process after the first checkpoint"
            return
        ours[-1].send_signal(signal.SIGKILL)
        self.killed, self.why = ours[-1].pid, "killed"


def _is_train_worker(p: psutil.Process) -> bool:
    try:
        return any("RayTrainWorker" in c for c in p.cmdline())
    except psutil.Error:  # exited meanwhile
        return False


def test_killed_worker_run_finishes_like_an_uninterrupted_one(stage1, demo_shards, demo_dir, tmp_path):
    out = str(tmp_path / "ft")
    killer = WorkerKiller(out, "killed")
    s = train(stage1_cfg(demo_shards, demo_dir, out, "killed", max_failures=2))
    killer.join(timeout=5)
    assert killer.killed, killer.why
    assert s["resumed_from"], "no worker was restored: the kill did not land mid-run"
    assert s["steps"] == stage1["steps"]
    assert s["last_loss"] == pytest.approx(stage1["last_loss"], rel=1e-4)
    # The restored workers started reading at the checkpoint's data position.
    start = s["resumed_from"][-1]
    assert [(_feed(out, r)["start_step"], _feed(out, r)["rows"]) for r in range(2)] == [(start, (42 - start) * 4)] * 2


def test_zero3_run_with_a_killed_worker_finishes_like_an_uninterrupted_one(stage1, stage2, demo_shards, tmp_path):
    """Stage 2 under ZeRO-3: checkpoints hold only trainable partitions and their optimizer
    state; the frozen vision tower comes back from ``init``. Same steps, same final loss,
    same exported weights as the uninterrupted run."""
    out = str(tmp_path / "z3")
    killer = WorkerKiller(out, "z3")
    s = train(stage2_cfg(demo_shards, stage1["hf"], out, "z3", checkpoint_every=10, max_failures=2))
    killer.join(timeout=5)
    assert killer.killed, killer.why
    assert s["resumed_from"] and s["steps"] == stage2["steps"]
    assert _losses(out) == pytest.approx(_losses(os.path.dirname(stage2["hf"])), rel=1e-4)
    resumed, uninterrupted = load_hf(s["hf"]), load_hf(stage2["hf"])
    for (name, a), (_, b) in zip(resumed.named_parameters(), uninterrupted.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_zero3_stage2_from_a_random_init_preset(demo_shards, demo_dir, tmp_path):
    """No `init`: the tiny preset is built whole and partitioned by DeepSpeed, not by zero.Init
    (transformers' weight init indexed an empty partition when it was built under ZeRO-3)."""
    s = train(TrainConfig(stage=2, data=str(demo_shards / "in"), output=str(tmp_path / "z3tiny"), name="z3tiny",
                          tokenizer=str(demo_dir / "tokenizer"), batch_size=4, zero_stage=3, max_steps=2,
                          log_every=100))
    assert s["steps"] == 2 and np.isfinite(s["last_loss"])
    assert load_hf(s["hf"]).config.text_config.vocab_size == len(load_tokenizer(str(demo_dir / "tokenizer")))


def test_s3_checkpoints_resume_after_a_driver_level_failure(stage1, demo_shards, demo_dir, s3_endpoint):
    out = f"{s3_endpoint}/runs/s1"
    cfg = stage1_cfg(demo_shards, demo_dir, out, "crashy", max_failures=0)
    killer = WorkerKiller(out, "crashy")
    with pytest.raises(Exception):  # noqa: B017 - Ray wraps the worker death in its own error
        train(cfg)
    killer.join(timeout=5)
    assert killer.killed, killer.why
    s = train(cfg)  # same output + name: Ray Train resumes from the latest S3 checkpoint
    assert s["resumed_from"] and s["steps"] == stage1["steps"]
    assert s["last_loss"] == pytest.approx(stage1["last_loss"], rel=1e-4)
    assert storage.exists(storage.join(out, "hf", "model.safetensors"))


def test_stage2_lora_exports_a_merged_plain_model(stage1, demo_shards, tmp_path):
    s2 = train(TrainConfig(stage=2, data=str(demo_shards / "in"), output=str(tmp_path / "lora"), name="lora",
                           init=stage1["hf"], batch_size=4, lr=1e-2, mm_projector_lr=2e-3, epochs=1,
                           zero_stage=2, lora_r=8, lora_alpha=16, lora_dropout=0.0, log_every=100))
    assert _falls(_losses(str(tmp_path / "lora")))
    before, after = load_hf(stage1["hf"]), load_hf(s2["hf"])  # strict load: no LoRA keys left
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(dict(before.named_parameters())[name], dict(after.named_parameters())[name])
    vision = "model.vision_tower.embeddings.patch_embedding.weight"
    assert torch.equal(dict(before.named_parameters())[vision], dict(after.named_parameters())[vision])


def test_stage2_lora_under_zero3_exports_a_merged_plain_model(stage1, demo_shards, tmp_path):
    """LoRA with the paper's stage-2 ZeRO-3: adapters on partitioned weights, merged per
    gathered block at export, so hf/ is a plain model that differs from stage 1 in the LLM."""
    s2 = train(TrainConfig(stage=2, data=str(demo_shards / "in"), output=str(tmp_path / "lora3"), name="lora3",
                           init=stage1["hf"], batch_size=4, lr=1e-2, zero_stage=3, lora_r=8, lora_alpha=16,
                           lora_dropout=0.0, max_steps=4, log_every=100))
    assert s2["steps"] == 4 and np.isfinite(s2["last_loss"])
    before, after = load_hf(stage1["hf"]), load_hf(s2["hf"])  # strict load: no LoRA keys left
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(dict(before.named_parameters())[name], dict(after.named_parameters())[name])
    vision = "model.vision_tower.embeddings.patch_embedding.weight"
    assert torch.equal(dict(before.named_parameters())[vision], dict(after.named_parameters())[vision])
