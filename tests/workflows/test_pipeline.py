"""The demo pipeline as users run it on a cluster: `ray start --head`, then `ray job submit`."""

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port

pytestmark = pytest.mark.slow  # starts Ray jobs / Serve: not in `make test-fast`

REPO = Path(__file__).parents[2]
RAY = str(Path(sys.executable).parent / "ray")
STEPS = ["demo-data", "preprocess-alignment", "preprocess-instruction", "stage1", "stage2",
         "evaluate", "export", "deploy"]
ARTIFACTS = {"demo-data": "demo-data", "preprocess-alignment": "data/alignment",
             "preprocess-instruction": "data/instruction", "stage1": "stage1", "stage2": "stage2",
             "evaluate": "eval", "export": "model", "deploy": "deploy"}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """The demo recipe, reduced to keep CI short (fewer images and steps, a free port)."""
    doc = yaml.safe_load((REPO / "workflows/configs/demo.yaml").read_text())
    doc["demo_data"]["variants"] = 2
    for stage in ("stage1", "stage2"):
        doc[stage].update(max_steps=6, checkpoint_every=3, log_every=3)
    doc["eval"].update(limit=8, cpus_per_replica=0.5)
    doc["deploy"]["port"] = free_port()
    path = tmp_path_factory.mktemp("recipe") / "demo-ci.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    return path


def submit(head, recipe: Path, run: Path) -> str:
    address, env = head.dashboard, head.env
    job = f"pipeline-{uuid.uuid4().hex[:8]}"
    for _ in range(30):  # the head's job agent registers a few seconds after `ray start`
        proc = subprocess.run(
            [RAY, "job", "submit", f"--address={address}", "--working-dir", ".", f"--submission-id={job}",
             "--", sys.executable, "workflows/pipeline.py", "--config", str(recipe), "--output", str(run)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        if "No available agent" not in proc.stderr:
            break
        time.sleep(2)
    from ray.job_submission import JobStatus, JobSubmissionClient

    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    status = JobSubmissionClient(address).get_job_status(job)
    assert status == JobStatus.SUCCEEDED, proc.stdout[-4000:] + proc.stderr[-2000:]
    return proc.stdout


def statuses(run: Path) -> dict[str, str]:
    return {k: v["status"] for k, v in json.loads((run / "summary.json").read_text())["steps"].items()}


def test_job_submit_runs_skips_and_resumes(ray_head, recipe, tmp_path):
    head = ray_head
    run = tmp_path / "run"
    out = submit(head, recipe, run)
    assert statuses(run) == dict.fromkeys(STEPS, "ran")
    # The console (what `ray job logs` shows, no TTY): short, one start and one end line per
    # step, training lines with ETA and grad norm; worker chatter stays in the log files.
    lines = out.splitlines()
    assert len(lines) <= 300, f"{len(lines)} console lines"
    for step in STEPS:
        assert [sum(f"[pipeline] {step}: {what}" in x for x in lines) for what in ("running", "done in")] == [1, 1]
    assert any(x.startswith("[stage 2] step 6/6 ") and " gnorm " in x and " eta " in x for x in lines), out
    assert not any("RayTrainWorker" in x or "Checkpoint successfully created" in x for x in lines)
    assert (run / "stage2" / "logs" / "rank1.log").is_file()
    for step, artifact in ARTIFACTS.items():
        marker = json.loads((run / artifact / "_SUCCESS").read_text())
        assert marker["step"] == step and len(marker["hash"]) == 16
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["instruction"]["records_in"] == summary["data"]["instruction"]["records_kept"]
    assert summary["stages"]["stage2"]["steps"] == 6 and summary["eval"]["n"] == 8
    assert summary["sample"]["answer"] is not None and summary["sample"]["image"].endswith(".dcm")
    assert (run / "model" / "model.safetensors").is_file() and (run / "eval" / "metrics.json").is_file()
    assert {p.name for p in (run / "plots").iterdir()} == {"stage1_loss.png", "stage2_loss.png", "eval_metrics.png"}
    assert "| stage2 |" in (run / "summary.md").read_text()
    assert summary["page"].startswith("http://127.0.0.1:") and f"Web page: {summary['page']}" in out  # issue #33
    # demo.yaml holds 10% of each corpus out: each stage's last step has its validation loss
    assert all(summary["stages"][k]["last_val_loss"] > 0 for k in ("stage1", "stage2"))

    out = submit(head, recipe, run)  # everything is complete: every step is skipped
    assert statuses(run) == dict.fromkeys(STEPS, "skipped")
    assert out.count("skipped (complete") == len(STEPS)

    stage1_done = (run / "stage1" / "_SUCCESS").read_text()
    assert json.loads((run / "stage2" / "feed" / "rank0.json").read_text())["start_step"] == 0
    (run / "stage2" / "_SUCCESS").unlink()  # as if the job died in stage 2 after its last checkpoint
    out = submit(head, recipe, run)
    assert statuses(run) == {s: "skipped" if STEPS.index(s) < STEPS.index("stage2") else "ran" for s in STEPS}
    assert (run / "stage1" / "_SUCCESS").read_text() == stage1_done  # nothing before stage 2 redone
    # Stage 2 restored its checkpoint (step 6 of 6) instead of training again from step 0.
    assert json.loads((run / "stage2" / "feed" / "rank0.json").read_text())["start_step"] == 6
    assert "[stage 2] resuming from checkpoint at step 6" in out
