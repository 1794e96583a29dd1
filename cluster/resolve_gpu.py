"""The GPU install set: ``pip install -c constraints-gpu.txt -e ".[vllm]"`` (cluster/Dockerfile,
cluster/aws.yaml), resolved by pip against the package index as a clean machine would.

``constraints.txt`` is the CPU dev venv's freeze and cannot be the GPU set: ``ray[llm]`` 2.60
pins ``vllm[audio]==0.29.0``, whose own pins exclude four of its versions (``OVERRIDDEN``).
``constraints-gpu.txt`` is therefore derived: the CPU-tested versions wherever vLLM allows them,
pip's choice for the rest (vLLM, CUDA torch and what only they need).

    python cluster/resolve_gpu.py            # does the GPU set resolve? (tests/test_install.py)
    python cluster/resolve_gpu.py --pin      # re-derive constraints-gpu.txt after a bump

Both ignore what is installed and any local wheel directory (``PIP_FIND_LINKS``, pip's config
files): a resolve that only works beside this machine's CPU wheels proves nothing for an image.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU, GPU = ROOT / "constraints.txt", ROOT / "constraints-gpu.txt"

# CPU pins vLLM's dependency tree forbids (checked with pip's resolver, 2026-12-07).
OVERRIDDEN = {
    "fastapi": "vllm 0.29.0 needs fastapi<0.137",
    "numpy": "mistral_common (vLLM) needs numpy<2.4 on Python <=3.12",
    "protobuf": "nvidia-cutlass-dsl (vLLM's kernels) needs protobuf<7",
    "grpcio-reflection": "its 1.85 line needs protobuf>=7",
}


def _name(line: str) -> str:
    return line.split("==")[0].strip().lower().replace("_", "-")


def resolve(constraints: Path, report: Path | None = None) -> subprocess.CompletedProcess:
    """pip's resolver on the GPU install, nothing installed (``--dry-run --ignore-installed``)."""
    env = {k: v for k, v in os.environ.items() if k != "PIP_FIND_LINKS"} | {"PIP_CONFIG_FILE": os.devnull}
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
           "-c", str(constraints), "-e", f"{ROOT}[vllm]"]
    if report:
        cmd += ["--report", str(report)]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)


def pin() -> None:
    """Write constraints-gpu.txt: constraints.txt without ``OVERRIDDEN``, resolved, frozen."""
    with tempfile.TemporaryDirectory() as tmp:
        base, report = Path(tmp) / "base.txt", Path(tmp) / "report.json"
        base.write_text("".join(line for line in CPU.read_text().splitlines(keepends=True)
                                if _name(line) not in OVERRIDDEN))
        proc = resolve(base, report)
        if proc.returncode:
            sys.exit(proc.stderr)
        chosen = json.loads(report.read_text())["install"]
    pins = sorted((f"{p['metadata']['name']}=={p['metadata']['version']}" for p in chosen
                   if _name(p["metadata"]["name"]) != "medvl"), key=str.lower)
    why = "".join(f"#   {name}: {reason}\n" for name, reason in OVERRIDDEN.items())
    GPU.write_text("# The GPU install set (cluster/Dockerfile, cluster/aws.yaml, README's GPU quick start):\n"
                   '#   pip install -c constraints-gpu.txt -e ".[vllm]"\n'
                   "# Written by `python cluster/resolve_gpu.py --pin`: constraints.txt's CPU-tested versions,\n"
                   "# except where vLLM (ray[llm] 2.60 pins vllm 0.29.0) forbids them:\n" + why +
                   "# and pip's resolve for the rest (vLLM, CUDA torch). tests/test_install.py resolves it.\n"
                   + "".join(p + "\n" for p in pins))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pin", action="store_true", help="re-derive constraints-gpu.txt")
    if parser.parse_args().pin:
        pin()
        return
    proc = resolve(GPU)
    sys.exit(proc.returncode and proc.stderr)


if __name__ == "__main__":
    main()
