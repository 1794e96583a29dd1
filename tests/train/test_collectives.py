"""Collectives on host data work under a process group with no CPU backend, as Ray Train's
NCCL group on GPU workers is, and medvl issues no collective outside the audited helper.

``cuda:gloo`` is a real gloo process group registered for CUDA tensors only: a CPU tensor
collective on it fails exactly as on NCCL ("No backend type associated with device type
cpu"), so the GPU-only failure of ``sync_metrics`` shows on a CPU machine.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

import medvl
from medvl.train import collectives
from medvl.train.loop import sync_metrics

WORLD = 2


BACKENDS = ("cuda:gloo", "gloo")  # GPU workers' case (no CPU backend, as NCCL); CPU workers'


def _worker(rank: int, tmp: str) -> None:
    """One rank: the real ``sync_metrics`` on a real 2-process group per backend, results to ``tmp``."""
    for backend in BACKENDS:
        dist.init_process_group(backend, init_method=f"file://{tmp}/{backend}", rank=rank, world_size=WORLD)
        try:
            pending = [{"step": s, "loss": 1.0 + rank + s, "tokens": 10.0 * (rank + 1), "padded": 40.0,
                        "lr": 0.1, "grad_norm": None, "step_s": 2.0, "data_wait": 0.0, "time": 0.0} for s in (1, 2)]
            records = sync_metrics(pending, WORLD)
            own = collectives.host_group() is dist.group.WORLD
            Path(tmp, f"{backend}-{rank}.json").write_text(json.dumps({"records": records, "default_group": own}))
        finally:
            dist.destroy_process_group()


def test_sync_metrics_without_a_cpu_backend(tmp_path):
    # fork: the ranks share this process's imports (a spawn re-imports Ray and transformers).
    mp.start_processes(_worker, args=(str(tmp_path),), nprocs=WORLD, start_method="fork")
    for backend in BACKENDS:
        results = [json.loads((tmp_path / f"{backend}-{r}.json").read_text()) for r in range(WORLD)]
        assert results[0]["records"] == results[1]["records"]  # every rank sees the global numbers
        step1, step2 = results[0]["records"]
        assert step1["loss"] == pytest.approx(2.5) and step2["loss"] == pytest.approx(3.5)  # mean over ranks
        assert step1["tokens_per_s"] == pytest.approx(15.0) and step1["padding"] == pytest.approx(1 - 30 / 80)
        # CPU workers reuse their gloo group; GPU workers get one gloo group beside NCCL.
        assert all(r["default_group"] == (backend == "gloo") for r in results), backend


COLLECTIVE_MODULES = ("torch.distributed", "deepspeed.comm")


def _dotted(node: ast.expr) -> str:
    """``a.b.c`` for an attribute chain on a name, else ''."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ""


def _distributed_uses(tree: ast.AST) -> list[int]:
    """Lines importing or naming ``torch.distributed`` / ``deepspeed.comm`` (incl. ``from torch import distributed``)."""
    def hit(name: str) -> bool:
        return any(name == m or name.startswith(m + ".") for m in COLLECTIVE_MODULES)

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or "", *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Attribute):
            names = [_dotted(node)]
        else:
            continue
        if any(hit(n) for n in names):
            lines.append(node.lineno)
    return sorted(set(lines))


def test_scan_finds_a_direct_collective():
    """The scan below would have flagged the original ``sync_metrics``."""
    for src in ("torch.distributed.all_reduce(t)", "import torch.distributed as dist",
                "from torch import distributed", "from deepspeed.comm import all_reduce"):
        assert _distributed_uses(ast.parse(src)) == [1], src


def test_only_the_helper_calls_torch_distributed():
    """A new CPU-tensor collective cannot slip in: only medvl/train/collectives.py, whose
    helpers take host numbers and pick the group, may use torch.distributed."""
    root = Path(medvl.__file__).parent
    helper = Path(collectives.__file__).resolve()
    offenders = {str(p.relative_to(root)): lines for p in sorted(root.rglob("*.py"))
                 if p.resolve() != helper and (lines := _distributed_uses(ast.parse(p.read_text())))}
    assert offenders == {}
