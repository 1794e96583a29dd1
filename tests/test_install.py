"""The GPU install resolves as the images run it, and a serving backend that is not installed
on the serve nodes stops a pipeline before its first step, not after training."""

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from medvl import placement
from medvl.cli import main as cli_main
from medvl.placement import Placement, check_serve_backend

REPO = Path(__file__).parents[1]


@pytest.mark.slow  # ~1.5 min: pip fetches the metadata of ~270 packages from the index
def test_gpu_install_set_resolves_with_pips_resolver():
    """`pip install -c constraints-gpu.txt -e ".[vllm]"` on a clean machine (dry run, nothing
    installed, no local wheels): what cluster/Dockerfile and cluster/aws.yaml run. With
    constraints.txt instead it is ResolutionImpossible (fastapi 0.165 against vLLM's <0.137)."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, "cluster/resolve_gpu.py"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"GPU install set resolved in {time.time() - t0:.0f} s")


@pytest.fixture
def vllm_recipe(tmp_path):
    """The demo recipe serving with vLLM (not installed in this venv)."""
    doc = yaml.safe_load((REPO / "workflows/configs/demo.yaml").read_text())
    doc["serve"]["backend"] = "vllm"
    path = tmp_path / "vllm.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    return path


@pytest.mark.slow  # a Ray task
def test_missing_vllm_stops_the_pipeline_before_any_step(ray_cluster, vllm_recipe, tmp_path, capsys):
    if importlib.util.find_spec("vllm"):
        pytest.skip("vLLM is installed here: the check has nothing to refuse")
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        cli_main(["pipeline", "--config", str(vllm_recipe), "--output", str(run)])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2
    assert len(err.splitlines()) == 1, err
    assert "backend: vllm needs vllm, ray.serve.llm on the serve nodes" in err and "constraints-gpu.txt" in err
    assert not (run / "demo-data").exists() and not (run / "stage1").exists()  # nothing ran


@pytest.mark.slow  # a Ray task
def test_backend_check_passes_where_its_modules_import(ray_cluster, monkeypatch):
    """The same task, placed as a CPU replica would be, with modules that are installed."""
    monkeypatch.setitem(placement.BACKEND_MODULES, "vllm", ("json", "ray.serve"))
    check_serve_backend("vllm", 0.5, 0, Placement())
