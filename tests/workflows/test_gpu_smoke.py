"""The GPU smoke script's CPU mode: the same script `make gpu-smoke` runs on a GPU, at tiny
sizes, so it cannot rot before a GPU is lent (workflows/gpu_smoke.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port

REPO = Path(__file__).parents[2]


@pytest.mark.slow  # trains both stages and starts Serve
def test_cpu_smoke_passes_every_step(ray_head, tmp_path):
    out = tmp_path / "smoke"
    env = {**ray_head.env, "RAY_ADDRESS": ray_head.gcs}  # a cluster's driver, as under `ray job submit`
    proc = subprocess.run([sys.executable, "workflows/gpu_smoke.py", "--cpu", "--out", str(out),
                           "--port", str(free_port())], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "smoke.json").read_text())
    assert [k for k, v in report.items() if "ok" in v] == ["device", "model", "data", "probe 1", "stage1", "probe 2", "pipeline", "mfu"]
    assert all(v["ok"] for v in report.values() if "ok" in v)
    for stage in ("stage1", "stage2"):  # past the first metrics window (step 10) and its checkpoint
        metrics = [json.loads(x) for x in (out / "run" / stage / "metrics.jsonl").read_text().splitlines()]
        assert metrics[-1]["step"] == 12 and report[f"{stage}_figures"]["step_s"] > 0
    assert "[smoke] all steps passed" in proc.stdout


def test_gpu_recipe_trains_each_stage_past_the_first_metrics_window(tmp_path):
    """At the GPU sizes (batch 32 and 16 on one worker) each stage still runs STEPS steps on the
    demo corpus the recipe builds: past step 10's metrics window and checkpoint."""
    from medvl.data.demo import build_demo_data
    from medvl.train.feed import FeedPlan
    from workflows.gpu_smoke import STEPS, smoke_recipe

    doc = yaml.safe_load(smoke_recipe(tmp_path, ("vision", "llm"), cpu=False, port=free_port()).read_text())
    counts = build_demo_data(str(tmp_path / "demo"), variants=doc["demo_data"]["variants"])
    for stage, records in (("stage1", "alignment_train"), ("stage2", "instruction_train")):
        s = doc[stage]
        plan = FeedPlan(shards=("x",), shard_rows=(counts[records],), world=s["num_workers"],
                        share=s["batch_size"] * s.get("grad_accum", 1), seed=0, epochs=s["epochs"],
                        group_by_length=False, max_steps=s["max_steps"])
        assert plan.steps == STEPS, (stage, counts[records], s["batch_size"], s["epochs"])



def test_gpu_mode_writes_bf16_towers_without_touching_the_gpu(tmp_path, monkeypatch):
    """The smoke process lives on as the pipeline's driver: its towers are built on the host
    (here, with no CUDA at all), never leaving a CUDA context and cached memory on the GPU the
    workers and vLLM need. The tiny shapes stand in for the real ones (size is not checked)."""
    import torch
    from safetensors.torch import load_file

    from benchmarks import gpu_mfu
    from workflows.gpu_smoke import write_towers

    real = gpu_mfu.shapes
    monkeypatch.setattr(gpu_mfu, "shapes", lambda smoke: real(smoke=True))
    for d in write_towers(tmp_path, cpu=False):
        assert {t.dtype for t in load_file(Path(d) / "model.safetensors").values()} == {torch.bfloat16}
    assert not torch.cuda.is_initialized()
