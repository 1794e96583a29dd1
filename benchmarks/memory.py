"""Host memory of training at the real architecture, rehearsed at a size this machine holds.

One run, printed as a table. The rehearsal model has the real shape: a Llama-2-shaped LLM
(hidden 1536, MLP 4096, 12 heads, 8 layers: 0.23B parameters, Llama-2-7B's proportions)
+ a small CLIP tower +
mlp2x_gelu, random-init and saved to disk in bf16 by this script (in a subprocess, so the
driver's own figures stay clean). Stage 1 (ZeRO-2, projector only) starts from the two
tower directories, stage 2 (ZeRO-3, projector + LLM) from stage 1's export; 2 CPU workers,
2 steps each, the final export included. A sampler thread reads the RSS of the driver and of
every Ray Train worker of this run every 20 ms; the workers also record their own peak per
phase (``OUTPUT/memory/rank*.json``: load, DeepSpeed set-up, the first step's forward,
backward and optimizer step, the first checkpoint, the rest of training, export), from which
the ZeRO-3 worker's peak is accounted for term by term against what ZeRO-3 must hold
(``zero3_expected``); stage 2 checkpoints every step, and each rank's seconds per checkpoint
give the training stall (``checkpoint_stall``). Memory is
anonymous RSS (as ``medvl.train.memory.Statm`` reads it): safetensors maps model files, and those
file-backed pages are reclaimable page cache shared by a node's workers, not process memory.
(A 0.41B rehearsal did not fit: on CPU stage 2 holds optimizer state, gradients and
DeepSpeed's buckets in host RAM, ~6 W per worker, where a GPU holds them in GPU memory.)

Figures are (peak - idle RSS) / W, W = the weights' size in the training dtype. On a GPU that
dtype is bf16; on this CPU training runs in fp32 (bf16 matmuls run at 0.3 GFLOP/s here), so
W = 4 bytes x parameters and the ratios are those a bf16 run has against its bf16 weights.
On a GPU the optimizer state and gradients live in GPU memory; here they are host memory,
so the CPU "train" phase is an upper bound of what a GPU worker holds on the host.

``--code DIR`` runs the same rehearsal on another checkout of medvl (e.g. the previous
commit, in a git worktree) to print its figures first, in the same table; ``--reuse-before``
takes that column from an earlier run's ``WORKDIR/before.json``. The "first seen" row is
the external sampler's (it first sees a worker before its imports); the workers' own
records start after imports, at the RSS the model is loaded from.

The table's last row, the worst-case training step, is ``worst_case_step.py``'s (alone:
``--worst-case-only``).

Usage: python benchmarks/memory.py [--workdir benchmarks/out/memory] [--code DIR] [--zero3-only]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import psutil
from worst_case_step import worst_case_row  # this directory: the row's own script

SHAPE = dict(hidden_size=1536, intermediate_size=4096, num_attention_heads=12, num_key_value_heads=12)
LAYERS = 8  # the rehearsal LLM; LAYERS // 2 for the second stage-1 checkpoint size
WORKERS = 2
BLOCK = 4 * (4 * SHAPE["hidden_size"] ** 2 + 3 * SHAPE["hidden_size"] * SHAPE["intermediate_size"])  # fp32
VISION_HIDDEN = 256
H = SHAPE["hidden_size"]
PROJECTOR = 4 * (VISION_HIDDEN * H + H + H * H + H)  # mlp2x_gelu, fp32: trainable in stage 2, not in W
SHARD_MB = 190  # ~W/5: a 13B model (26 GB in bf16) in 5 GB shards
ALLOWANCE = 0.25  # W over the expected ZeRO-3 terms: activations of the rehearsal's batch, allocator


def make_towers(root: str, layers: int, tokenizer: str) -> None:
    """A CLIP tower and a Llama-2-shaped LLM, random-init, saved in bf16 (run in a subprocess)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from medvl.tokenizer import load

    torch.manual_seed(0)
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=VISION_HIDDEN, intermediate_size=1024, num_hidden_layers=4,
                                              num_attention_heads=4, image_size=32, patch_size=8))
    vision.to(torch.bfloat16).save_pretrained(f"{root}/vit")
    with torch.device("meta"):  # initialise straight in bf16, one layer at a time
        llm = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, vocab_size=len(load(tokenizer)),
                                           max_position_embeddings=512, **SHAPE))
    llm = llm.to_empty(device="cpu").to(torch.bfloat16)
    for p in llm.parameters():
        torch.nn.init.normal_(p, std=0.02)
    llm.save_pretrained(f"{root}/llm-{layers}")


def anon_rss(proc: psutil.Process) -> int:
    """What ``medvl.train.memory.Statm`` reads, via psutil here because this sampler
    watches many processes and ``--code`` rehearses checkouts that predate that module."""
    m = proc.memory_info()
    return m.rss - getattr(m, "shared", 0)


class Sampler(threading.Thread):
    """Peak and first-seen RSS of this process and of every Ray Train worker below it."""

    def __init__(self):
        super().__init__(daemon=True)
        self.me = psutil.Process()
        self.driver_idle = anon_rss(self.me)
        self.driver_peak = self.driver_idle
        self.workers: dict[int, list[int]] = {}  # pid -> [first, peak]
        self.running = True
        self.start()

    def run(self) -> None:
        while self.running:
            self.driver_peak = max(self.driver_peak, anon_rss(self.me))
            for p in self.me.children(recursive=True):
                try:
                    if not any("RayTrainWorker" in c for c in p.cmdline()):
                        continue
                    rss = anon_rss(p)
                except psutil.Error:
                    continue
                first_peak = self.workers.setdefault(p.pid, [rss, rss])
                first_peak[1] = max(first_peak[1], rss)
            time.sleep(0.02)

    def stop(self) -> None:
        self.running = False
        self.join()


def run_stage(cfg) -> dict:
    from medvl.train.trainer import train

    sampler = Sampler()
    t0 = time.time()
    try:
        train(cfg)
    except Exception as e:  # noqa: BLE001 - e.g. OOM-killed workers: a result, reported as such
        sampler.stop()
        traceback.print_exc()
        reason = "OOM-killed" if "low on memory" in str(e) else type(e).__name__
        return {"error": reason, "driver": sampler.driver_peak - sampler.driver_idle,
                "workers": [p - f for f, p in sampler.workers.values()], "phases": {}, "checkpoint_bytes": 0}
    sampler.stop()
    phases = {f.stem: json.loads(f.read_text()) for f in sorted(Path(cfg.output, "memory").glob("rank*.json"))}
    feeds = [json.loads(f.read_text()) for f in sorted(Path(cfg.output, "feed").glob("rank*.json"))]
    workers = sorted(sampler.workers.values(), key=lambda fp: -fp[1])[:WORKERS]
    return {"driver": sampler.driver_peak - sampler.driver_idle, "workers": [p - f for f, p in workers],
            "phases": phases, "seconds": time.time() - t0,
            "checkpoints": [f.get("checkpoints", []) for f in feeds],  # per rank, per save: seconds
            "upload_s": upload_seconds(Path(cfg.output, cfg.name)),
            "checkpoint_bytes": checkpoint_bytes(Path(cfg.output, cfg.name))}


def upload_seconds(run: Path) -> float:
    """Seconds to copy the newest checkpoint with ``pyarrow.fs.copy_files`` into the same
    storage: what a synchronous ``ray.train.report`` does before it returns (Ray's
    ``persist_current_checkpoint``), so the stall the loop had before uploads went async."""
    import pyarrow.fs as pafs

    ckpts = sorted(d for d in run.glob("checkpoint_*") if d.is_dir())
    if not ckpts:
        return 0.0
    copy = run.parent / "upload-copy"
    t0 = time.perf_counter()
    pafs.copy_files(str(ckpts[-1]), str(copy))
    seconds = time.perf_counter() - t0
    shutil.rmtree(copy)
    return seconds


def checkpoint_bytes(run: Path) -> int:
    """Bytes of the newest checkpoint directory of a Ray Train run."""
    ckpts = sorted(d for d in run.glob("checkpoint_*") if d.is_dir())
    return sum(f.stat().st_size for f in ckpts[-1].rglob("*") if f.is_file()) if ckpts else 0


def rehearse(root: Path, zero3_only: bool = False) -> dict:
    """Stage 1 at two LLM sizes (checkpoint bytes), stage 2 from the larger one; with
    ``zero3_only``, stage 2 alone, stage 1's figures and export taken from the previous run."""
    import ray

    from medvl.data.demo import build_demo_data
    from medvl.data.preprocess import PreprocessConfig, preprocess
    from medvl.train.config import TrainConfig

    tok = str(root / "demo/tokenizer")
    if not (root / "demo").exists():
        build_demo_data(str(root / "demo"), variants=1)
    for layers in (LAYERS, LAYERS // 2):
        if not (root / f"towers/llm-{layers}").exists():
            subprocess.run([sys.executable, __file__, "--make-towers", str(root / "towers"),
                            "--layers", str(layers), "--tokenizer", tok], check=True)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    data = {}
    for corpus, template in (("alignment", "plain"), ("instruction", "v1")):
        data[corpus] = str(root / f"data-{corpus}")
        if not Path(data[corpus]).exists():
            preprocess(PreprocessConfig(data=str(root / f"demo/{corpus}_train.jsonl"),
                                        image_root=str(root / "demo/images"), output=data[corpus], tokenizer=tok,
                                        template=template, image_size=32, num_image_tokens=16, max_length=256))
    common = dict(tokenizer=tok, num_workers=WORKERS, batch_size=1, max_steps=2, log_every=10**9,
                  vision_tower=str(root / "towers/vit"))
    if "max_shard_mb" in TrainConfig.__dataclass_fields__:  # absent before the workers exported
        common["max_shard_mb"] = SHARD_MB
    results = {k: v for k, v in json.loads((root / "after.json").read_text()).items()
               if k.startswith("s1")} if zero3_only else {}
    for layers in () if zero3_only else (LAYERS // 2, LAYERS):
        out = root / f"run-s1-{layers}"
        shutil.rmtree(out, ignore_errors=True)
        results[f"s1-{layers}"] = run_stage(TrainConfig(
            stage=1, data=data["alignment"], output=str(out), name="s1", zero_stage=2,
            llm=str(root / f"towers/llm-{layers}"), **common))
    out = root / "run-s2"
    shutil.rmtree(out, ignore_errors=True)
    results["s2"] = run_stage(TrainConfig(
        stage=2, data=data["instruction"], output=str(out), name="s2", zero_stage=3, lr=2e-5, checkpoint_every=1,
        init=str(root / f"run-s1-{LAYERS}/hf"), **{k: v for k, v in common.items() if k != "vision_tower"}))
    ray.shutdown()
    return results


def weights_bytes(root: Path, layers: int, parts: tuple[str, ...] = ("vit", "llm")) -> int:
    """Parameters of the rehearsal model (from the bf16 files) x 4 bytes (fp32 training here)."""
    from safetensors import safe_open

    n = 0
    dirs = [root / "towers" / (part if part == "vit" else f"llm-{layers}") for part in parts]
    for f in (f for d in dirs for f in d.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())  # noqa: SIM118
    return 4 * n


def figures(res: dict, w: int) -> dict[str, float | None]:
    """The table's values for one rehearsal (None where the code records no phases)."""
    gb = 1e9
    s1, s2 = res[f"s1-{LAYERS}"], res["s2"]
    if "error" in s1:  # stage 1 has no worker figures to show (its traceback is printed above)
        raise SystemExit(f"stage 1 failed ({s1['error']}): no figures")
    ranks = [r for r in s2["phases"].values()]

    def over(phase: str, key: str, base: str | None = None) -> float | None:
        if not ranks:
            return None
        return max((r["phases"][phase][key] - (r["phases"][base]["end"] if base else r["idle"]))
                   for r in ranks) / w

    if "error" in s2:
        return {"s2_outcome": s2["error"], "s1_worker": max(s1["workers"]) / w, "s1_driver": s1["driver"] / gb,
                "ckpt_small": res[f"s1-{LAYERS // 2}"]["checkpoint_bytes"] / 1e6,
                "ckpt_big": s1["checkpoint_bytes"] / 1e6}
    return {
        "s2_outcome": "finished",
        "s1_worker": max(s1["workers"]) / w, "s1_driver": s1["driver"] / gb,
        "s1_worker_own": max(max(p["peak"] for p in r["phases"].values()) - r["idle"]
                             for r in s1["phases"].values()) / w if s1["phases"] else None,
        "s2_worker": max(s2["workers"]) / w, "s2_load_end": over("load", "end"),
        "s2_own": max(max(p["peak"] for p in r["phases"].values()) - r["idle"] for r in ranks) / w if ranks else None,
        "s2_terms": zero3_accounting(s2, w) if "forward" in next(iter(s2["phases"].values()), {}).get("phases", {})
        else {},
        "s2_stall": checkpoint_stall(s2),
        "s2_load_peak": over("load", "peak"), "s2_export": over("export", "peak", base="train"),
        "s2_driver": s2["driver"] / gb,
        "ckpt_small": res[f"s1-{LAYERS // 2}"]["checkpoint_bytes"] / 1e6, "ckpt_big": s1["checkpoint_bytes"] / 1e6,
    }


# The phases a worker records, in order (``medvl.train.memory.PhasePeaks``; the first step's
# forward, backward and optimizer step and the first checkpoint are phases of their own), and
# what each leaves held under ZeRO-3 over 2 ranks in fp32 (DeepSpeed's stage-3 optimizer).
PHASES = {
    "load": "model partitioned by zero.Init (W/2)",
    "setup": "fp32 master partition + gradient partition (W/2 each)",
    "forward": "activations kept for backward",
    "backward": "gradients, reduce-scattered into the partition",
    "step": "Adam m and v (W/2 each)",
    "to checkpoint": "the step's metrics",
    "checkpoint": "ZeRO shards saved",
    "train": "the remaining steps",
    "export": "HF export (gathered per block)",
}


def zero3_terms(rank: dict) -> list[tuple[str, int, int]]:
    """(phase, bytes it left held over the previous phase's end, its peak over its start)."""
    rows, start = [], rank["idle"]
    for name in PHASES:
        if name in rank["phases"]:
            p = rank["phases"][name]
            rows.append((name, p["end"] - start, p["peak"] - start))
            start = p["end"]
    return rows


def zero3_accounting(s2: dict, w: int) -> dict[str, float]:
    """The worker with the highest own-record peak: each phase's held term up to the phase
    of the peak, that phase's rise over its start, their sum (= the peak, by construction:
    the accounting says which term is how much) in W."""
    terms = max((zero3_terms(r) for r in s2["phases"].values()),
                key=lambda t: max(sum(h for _, h, _ in t[:i]) + rise for i, (_, _, rise) in enumerate(t)))
    at = max(range(len(terms)), key=lambda i: sum(h for _, h, _ in terms[:i]) + terms[i][2])
    out = {f"held: {name}": held / w for name, held, _ in terms[:at]}
    out[f"rise: {terms[at][0]}"] = terms[at][2] / w
    out["sum"] = sum(out.values())
    return out


def checkpoint_stall(s2: dict) -> tuple[float, float]:
    """Seconds per checkpoint the slowest rank stood still: (synchronous upload: its save +
    a timed copy of the checkpoint, as report did; measured: wait + save + report)."""
    ranks = [c for c in s2.get("checkpoints", []) if c]
    if not ranks:
        return math.nan, math.nan
    save = max(sum(c["save_s"] for c in r) / len(r) for r in ranks)
    now = max(sum(c["wait_s"] + c["save_s"] + c["report_s"] for c in r) / len(r) for r in ranks)
    return save + s2["upload_s"], now


def _cell(v) -> str:
    if v is None:
        return f"{'n/a':>12}"
    return f"{v:>12}" if isinstance(v, str) else f"{v:>12.2f}"


def zero3_expected(w: int, llm: int, block: int) -> float:
    """What a ZeRO-3 worker must hold, / W: params, fp32 master, gradients, Adam m and v of the
    trainable LLM and projector partitioned over the workers (5 x (LLM + projector) / workers;
    the projector is 1.2% of W here, 0.2% at 13B), the frozen vision tower's partition, the
    gathered parameters ZeRO-3 may keep live (``zero3_live_limits``: 3 decoder blocks) and
    one block's full gradient before the reduce-scatter: 4 blocks."""
    return (5 * (llm + PROJECTOR) + (w - llm)) / (WORKERS * w) + 4 * block / w


def print_table(tables: list[tuple[str, dict]], w: int, block: int, shard: int, expected: float) -> None:
    zero3 = 1.5 / WORKERS + block / w
    z3_peak = expected + ALLOWANCE
    export = (shard + block) / w
    rows = [  # key, figure, target text, target test (None: context)
        ("s2_outcome", "stage 2 ZeRO-3 run (24 GB machine)", "finished", lambda v: v == "finished"),
        ("s1_worker", "stage 1 ZeRO-2: worker peak over first seen / W", "", None),
        ("s1_worker_own", "stage 1 ZeRO-2: worker peak over idle / W (own record)", "<=1.5", lambda v: v <= 1.5),
        ("s1_driver", "stage 1: driver peak over idle, GB", "<1.5", lambda v: v < 1.5),
        ("s2_load_end", "stage 2 ZeRO-3: worker RSS after loading / W", f"<={zero3:.2f}", lambda v: v <= zero3),
        ("s2_load_peak", "stage 2 ZeRO-3: worker load peak / W (rank 0 reads)", "", None),
        ("s2_export", "stage 2 ZeRO-3: export's increase / W", f"<={export:.2f}", lambda v: v <= export),
        ("s2_worker", "stage 2 ZeRO-3: worker whole-run peak / W (+opt. state)", "", None),
        ("s2_own", "stage 2 ZeRO-3: worker whole-run peak / W (own record)", f"<={z3_peak:.2f}",
         lambda v: v <= z3_peak),
        ("s2_driver", "stage 2: driver peak over idle, GB", "<1.5", lambda v: v < 1.5),
        ("ckpt_small", f"stage 1 checkpoint MB, LLM {LAYERS // 2} layers", "", None),
        ("ckpt_big", f"stage 1 checkpoint MB, LLM {LAYERS} layers", "same", None),
    ]
    values = [figures(res, w) for _, res in tables]
    print(f"\n{'figure':<58}" + "".join(f"{label:>12}" for label, _ in tables) + "  target")
    for key, name, target, ok in rows:
        cells = "".join(_cell(v.get(key)) for v in values)
        last = values[-1].get(key)
        if key == "ckpt_big":
            small = values[-1]["ckpt_small"]
            ok_now = abs(last - small) <= 0.02 * small
        else:
            ok_now = ok(last) if ok and last is not None else None
        verdict = "" if ok_now is None else ("  MET" if ok_now else "  MISSED")
        print(f"{name:<58}{cells}  {target}{verdict}")
    print(f"\nstage 2 ZeRO-3 worker's own peak, term by term (/ W; held: what a phase leaves over the one before; "
          f"rise: the peak phase's high over its start). Expected terms: {expected:.2f} W "
          f"(5 x (LLM + projector) / {WORKERS} + vision / {WORKERS} + 4 blocks), + {ALLOWANCE} for activations and allocator: target")
    for term, v in (values[-1].get("s2_terms") or {}).items():
        print(f"{'  ' + term:<30}{v:>8.2f}  {PHASES.get(term.split(': ')[-1], '= the peak')}")
    sync, now = values[-1].get("s2_stall", (math.nan, math.nan))
    print(f"\n{'figure':<58}{'sync':>12}{'async':>12}")
    print(f"{'stage 2 ZeRO-3: training stall per checkpoint, s':<58}{sync:>12.2f}{now:>12.2f}")



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="benchmarks/out/memory")
    ap.add_argument("--code", help="another medvl checkout to rehearse first (its figures print first)")
    ap.add_argument("--reuse-before", action="store_true",
                    help="take the 'before' column from WORKDIR/before.json of an earlier --code run")
    ap.add_argument("--make-towers", help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("--worst-case-only", action="store_true", help="only the worst-case step row (no rehearsal)")
    ap.add_argument("--zero3-only", action="store_true",
                    help="re-run stage 2 (ZeRO-3) alone; stage 1 from WORKDIR/after.json of an earlier full run")
    args = ap.parse_args()
    if args.make_towers:
        return make_towers(args.make_towers, args.layers, args.tokenizer)
    root = Path(args.workdir).resolve()
    if args.worst_case_only:
        return worst_case_row(root)
    if args.json:  # a child run on another checkout: figures only
        Path(args.json).write_text(json.dumps(rehearse(root)))
        return
    tables = []
    if args.reuse_before:
        tables.append(("before", json.loads((root / "before.json").read_text())))
    elif args.code:
        env = {**os.environ, "PYTHONPATH": os.path.abspath(args.code)}
        out = root / "before.json"
        # Its own data and towers: a checkout reads the shards its own preprocess writes.
        subprocess.run([sys.executable, __file__, "--workdir", str(root / "before"), "--json", str(out)],
                       check=True, env=env, cwd=args.code)
        tables.append(("before", json.loads(out.read_text())))
    tables.append(("after", rehearse(root, args.zero3_only)))
    (root / "after.json").write_text(json.dumps(tables[-1][1]))
    w = weights_bytes(root, LAYERS)
    print(f"\nrehearsal model: W = {w / 1e9:.2f} GB in the training dtype (fp32 here), one decoder "
          f"block {BLOCK / 1e6:.0f} MB, export shards <= {SHARD_MB} MB (W/5, as 5 GB is for a 13B model); "
          f"{WORKERS} workers, 2 steps per stage")
    print_table(tables, w, BLOCK, SHARD_MB * 10**6, zero3_expected(w, weights_bytes(root, LAYERS, ("llm",)), BLOCK))
    worst_case_row(root)


if __name__ == "__main__":
    main()
