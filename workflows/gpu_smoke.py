"""GPU smoke run: the whole real path on one GPU in a few minutes, before a multi-hour job.

``make gpu-smoke`` (one GPU, ~1.4B random-init model at Qilin-Med-VL's shape: CLIP
ViT-L/14-336 + ``mlp2x_gelu`` + a 1.1B Llama-2-style LLM) runs, in order, what a real
recipe runs, with the recipe's settings, not a benchmark's building blocks:

1. ``model``: random-init towers written as HF directories (``vision_tower`` / ``llm``).
2. ``data``: the pipeline's first steps, the demo corpus (real DICOM files) preprocessed at
   336 px and max length 2048; then ``probe 1``: ``medvl train --probe`` for stage 1, one
   worst-case batch (max length x batch size), forward and backward on the real engine,
   peak memory against capacity.
3. ``stage1``: the pipeline through stage 1 (ZeRO-2), whose model stage 2 starts from; then
   ``probe 2``, the same for stage 2.
4. ``pipeline``: the rest of the recipe (completed steps are skipped): stage 2 (ZeRO-3,
   bf16, gradient checkpointing), each stage on Ray Train with NCCL for ``STEPS`` steps (past
   the first metrics window and a checkpoint), evaluation with one model actor, the export,
   and Serve (vLLM where it imports, else ours) answering one real request through the
   ``openai`` client.
5. ``mfu``: stage-2 step time and MFU, ZeRO-3 with and without checkpointing, at max length
   (``benchmarks/gpu_mfu.py``'s runs).

It prints one PASS/FAIL line per step as it goes and then a table (GiB per GPU per phase,
step time, MFU), and exits non-zero if any step failed. ``--cpu`` runs the same script at
tiny sizes with gloo on CPU, inside ``make test``, so that it cannot rot before a GPU is lent.

Usage: python workflows/gpu_smoke.py [--out runs/gpu-smoke]        (one GPU, under 8 minutes)
       python workflows/gpu_smoke.py --cpu --out DIR                 (CPU, tiny; what the tests run)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks/ (the MFU runs) beside the installed medvl

STEPS = 12  # per stage: past the first metrics window (log_every 10) and a checkpoint at 10


def device(cpu: bool) -> dict:
    """The GPU run's first question: does this torch see the GPU? Its CUDA build needs a driver
    that supports it (constraints-gpu.txt's CUDA 13 wheels: driver 580 or newer); an older one
    leaves ``torch.cuda.is_available()`` False and every GPU step would fail for that reason."""
    import torch

    if cpu:
        return {"device": "cpu"}
    if not torch.cuda.is_available():
        raise RuntimeError(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: does the "
                           f"NVIDIA driver support CUDA {torch.version.cuda}? (nvidia-smi shows its version)")
    return {"device": torch.cuda.get_device_name(0), "cuda": torch.version.cuda}


def write_towers(out: Path, cpu: bool) -> tuple[str, str]:
    """Random-init CLIP vision tower and Llama LLM saved as HF directories (bf16 for the GPU
    run), so the workers load them the way they load real weights. Built on the host even
    for the GPU run: this process lives on as the pipeline's driver, and a CUDA context with
    the allocator's cached ~6 GB of init tensors would sit on the GPU beside the workers and
    under vLLM's start-up check of free memory (gpu_memory_utilization of the whole card)."""
    import torch
    from transformers import CLIPVisionModel, LlamaForCausalLM

    from benchmarks.gpu_mfu import shapes

    vision_cfg, text_cfg = shapes(smoke=cpu)  # the LLM's vocabulary becomes the demo tokenizer's
    dtype = torch.float32 if cpu else torch.bfloat16
    dirs = (out / "towers" / "vision", out / "towers" / "llm")
    for cls, cfg, d in ((CLIPVisionModel, vision_cfg, dirs[0]), (LlamaForCausalLM, text_cfg, dirs[1])):
        torch.manual_seed(0)
        cls(cfg).to(dtype).save_pretrained(d)
    return str(dirs[0]), str(dirs[1])


def smoke_recipe(out: Path, towers: tuple[str, str], cpu: bool, port: int) -> Path:
    """The demo recipe at the real shape and the production recipe's training settings."""
    doc = yaml.safe_load((REPO / "workflows/configs/demo.yaml").read_text())
    size, tokens, length = (56, 16, 256) if cpu else (336, 576, 2048)
    doc["run"] = str(out / "run")
    doc["demo_data"]["variants"] = 1
    for name in ("preprocess_alignment", "preprocess_instruction"):
        doc[name].update(image_size=size, num_image_tokens=tokens, max_length=length)
    gpu = {} if cpu else {"use_gpu": True, "num_workers": 1, "cpus_per_worker": 4, "bf16": True}
    for stage in ("stage1", "stage2"):
        # epochs=STEPS: every epoch has a step, so max_steps is reached whatever the batch (the
        # demo's 85 captions at 32 a step are 3 steps an epoch: 3 epochs stopped stage 1 at 9).
        doc[stage].update(vision_tower=towers[0], llm=towers[1], max_steps=STEPS, epochs=STEPS, checkpoint_every=10,
                          keep_checkpoints=1, log_every=10, gradient_checkpointing=stage == "stage2", **gpu)
    doc["stage1"].update(batch_size=4 if cpu else 32)
    doc["stage2"].update(batch_size=4 if cpu else 16)
    doc["eval"].update(limit=8, replicas=1, cpus_per_replica=0.5, **({} if cpu else {"use_gpu": True}))
    doc["serve"]["backend"] = "medvl" if cpu or not _imports("vllm") else "vllm"
    doc["deploy"].update(port=port, **({} if cpu else {"num_gpus": 1}))
    doc["placement"] = {"train_accelerator": "", "serve_accelerator": ""}
    path = out / "smoke.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    return path


def _imports(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def probe(recipe: Path, stage: int) -> dict:
    """``medvl train --probe``: the worst-case batch of one stage, as users run it."""
    proc = subprocess.run([sys.executable, "-m", "medvl.cli", "train", "--config", str(recipe), "--stage",
                           str(stage), "--probe"], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError((proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["?"])[-1])
    return {"output": proc.stdout.strip().splitlines()[-1:]}


def pipeline(recipe: Path, until: str | None = None) -> dict:
    """The recipe's steps up to ``until`` (all by default), as ``ray job submit`` runs them;
    steps a previous call completed are skipped. The deployed model's answer, after all."""
    from medvl.pipeline import run_pipeline

    try:
        summary = run_pipeline(str(recipe), until=until)
    finally:
        _stop_serving()
    names = list(summary["steps"])
    wanted = names[: names.index(until) + 1] if until else names
    failed = [s for s in wanted if summary["steps"][s]["status"] not in ("ran", "skipped")]
    if failed:
        raise RuntimeError(f"steps not run: {', '.join(failed)}")
    return {} if until else {"answer": summary["sample"]["answer"]}


def _stop_serving() -> None:
    """On a cluster the pipeline leaves the app serving; a smoke run leaves nothing behind."""
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()


def stage_figures(run: Path, stage: str) -> dict:
    """Median step time after warm-up and peak memory per phase, rank 0's record: GPU memory,
    or the host's on CPU."""
    metrics = [json.loads(x) for x in (run / stage / "metrics.jsonl").read_text().splitlines() if x]
    mem = json.loads((run / stage / "memory" / "rank0.json").read_text())["phases"]
    return {"step_s": statistics.median(m["step_s"] for m in metrics[2:] or metrics),
            "gib": {p: (v.get("device_peak") or v["peak"]) / 2**30 for p, v in mem.items()}}


def mfu(cpu: bool) -> list[dict]:
    """Stage 2 at max length, ZeRO-3 with and without checkpointing, each in its own process."""
    from benchmarks import gpu_mfu

    args = argparse.Namespace(steps=6 if cpu else 8, smoke=cpu)
    names = ("stage 2, ZeRO-3", "stage 2, ZeRO-3 + ckpt")
    results = [{"run": gpu_mfu.RUNS[i].name, **gpu_mfu.in_subprocess(i, args)}
               for i, r in enumerate(gpu_mfu.RUNS) if r.name in names]
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(errors[0])
    return results


def check(name: str, fn: Callable[[], object], report: dict) -> object:
    """Run one step; print and record PASS or FAIL with its time. A failure ends nothing here:
    later steps that need it fail in their turn, with their own reason."""
    t0 = time.time()
    try:
        value = fn()
        report[name] = {"ok": True, "s": time.time() - t0}
    except Exception as e:  # noqa: BLE001 - a smoke run reports every step
        traceback.print_exc()
        value, report[name] = None, {"ok": False, "s": time.time() - t0, "error": f"{type(e).__name__}: {e}"}
    print(f"[smoke] {name:<10} {'PASS' if report[name]['ok'] else 'FAIL'} {report[name]['s']:7.1f} s"
          f"{'  ' + report[name].get('error', '') if not report[name]['ok'] else ''}", flush=True)
    return value


def print_table(run: Path, report: dict, mfu_rows: list[dict] | None) -> None:
    print("\nstage     step s   GiB peak per phase, per GPU (host RSS on CPU)")
    for stage in ("stage1", "stage2"):
        try:
            f = stage_figures(run, stage)
        except (OSError, ValueError, KeyError):
            print(f"{stage:<9} (no figures: the stage did not finish)")
            continue
        report[f"{stage}_figures"] = f
        print(f"{stage:<9}{f['step_s']:>7.3f}   " + ", ".join(f"{p} {g:.1f}" for p, g in f["gib"].items()))
    for r in mfu_rows or []:
        mfu_share = r["tflops"] * 1e12 / 790e12
        print(f"{r['run']:<24} step {1000 * r['step_s']:.0f} ms  MFU {mfu_share:.1%}  peak {r['peak_gib']:.1f} GiB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="tiny sizes, gloo on CPU: checks the script (make test)")
    ap.add_argument("--out", default="runs/gpu-smoke", help="working directory (deleted first)")
    ap.add_argument("--port", type=int, default=8000, help="Serve's HTTP port")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir(parents=True)
    report: dict = {}
    check("device", lambda: device(args.cpu), report)
    towers = check("model", lambda: write_towers(out, args.cpu), report)
    recipe = smoke_recipe(out, towers or ("", ""), args.cpu, args.port)
    # Each probe reads what its stage reads (the data's manifest; stage 2 also stage 1's model),
    # so the pipeline runs up to there first, as a user would; later calls skip completed steps.
    for name, until, stage in (("data", "preprocess-instruction", 1), ("stage1", "stage1", 2)):
        check(name, lambda u=until: pipeline(recipe, until=u), report)
        check(f"probe {stage}", lambda s=stage: probe(recipe, s), report)
    check("pipeline", lambda: pipeline(recipe), report)
    rows = check("mfu", lambda: mfu(args.cpu), report)
    print_table(out / "run", report, rows)
    (out / "smoke.json").write_text(json.dumps(report, indent=1, default=str))
    failed = [k for k, v in report.items() if isinstance(v, dict) and v.get("ok") is False]
    print(f"\n[smoke] {'FAILED: ' + ', '.join(failed) if failed else 'all steps passed'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
