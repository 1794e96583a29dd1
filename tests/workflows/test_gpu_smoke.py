"""The GPU smoke script's CPU mode: the same script `make gpu-smoke` runs on a GPU, at tiny
sizes, so it cannot rot before a GPU is lent (workflows/gpu_smoke.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.slow  # trains both stages and starts Serve

REPO = Path(__file__).parents[2]


def test_cpu_smoke_passes_every_step(ray_head, tmp_path):
    out = tmp_path / "smoke"
    env = {**ray_head.env, "RAY_ADDRESS": ray_head.gcs}  # a cluster's driver, as under `ray job submit`
    proc = subprocess.run([sys.executable, "workflows/gpu_smoke.py", "--cpu", "--out", str(out),
                           "--port", str(free_port())], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "smoke.json").read_text())
    assert [k for k, v in report.items() if "ok" in v] == ["model", "probe 1", "probe 2", "pipeline", "mfu"]
    assert all(v["ok"] for v in report.values() if "ok" in v)
    for stage in ("stage1", "stage2"):  # past the first metrics window (step 10) and its checkpoint
        metrics = [json.loads(x) for x in (out / "run" / stage / "metrics.jsonl").read_text().splitlines()]
        assert metrics[-1]["step"] == 12 and report[f"{stage}_figures"]["step_s"] > 0
    assert "[smoke] all steps passed" in proc.stdout
