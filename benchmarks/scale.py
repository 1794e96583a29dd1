"""Data at ChiMed-VL size, rehearsed at N and 10·N records: one run, printed as a table.

Synthetic corpora (Chinese captions, LLaVA ``plain`` records) point at a pool of 256 real
images (random crops of the demo's clinical images, written once as JPEGs, as PMC figures
arrive); preprocessing runs at 336 px with 576 image tokens, the 13B recipe's stage 1.

Measured:
- preprocess driver peak RSS growth on a 580k-record text-only input (JSONL and the same
  as a JSON array), each in its own process; ``--before DIR`` (an older checkout, e.g. a git
  worktree of the commit before the streaming feed) gives today's figure first;
- peak RSS of any preprocess task against the memory it declares to Ray;
- shard bytes per record against the source image's bytes, and what PNG or JPEG-95 pixels
  would cost (size, decode rate on one core);
- the training feed of rank 0 of 2 at 32 rows per step (13B stage 1's micro batch), in a
  process pinned to one core with a 1-CPU Ray: bytes read ÷ its share of the shards, time
  to the first batch at N and 10·N, after a resume at the last step, and the steady rate;
  ``--before`` times the old feed's first batch (every rank read and sorted every shard).

Usage: python benchmarks/scale.py [--n 2048] [--workdir benchmarks/out/scale] [--before DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
SHARE, WORLD = 32, 2
CAPTION = "胸部X线片显示右下肺野片状阴影，考虑肺炎，建议结合临床。肝右叶见低密度结节，边界清楚。"


def make_pool(demo: Path, dest: Path, size: int = 256) -> list[str]:
    """``size`` distinct images (random crops of the demo's real clinical images, JPEG-90 at
    their own resolution, as PMC figures arrive): every record's pixels differ, as in ChiMed-VL."""

    from medvl.data.images import ImageSpec, decode

    base = []
    for src in sorted((demo / "images").rglob("*")):
        with contextlib.suppress(Exception):  # a file the demo keeps as a reject case
            base.append(decode(src.read_bytes(), src.name, ImageSpec()).convert("RGB"))
    dest.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(size):
        img = rng.choice(base)
        w, h = img.size
        s = rng.uniform(0.5, 1.0)
        cw, ch = int(w * s), int(h * s)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        img.crop((x, y, x + cw, y + ch)).save(dest / f"{i:03d}.jpg", quality=90)
    return sorted(os.listdir(dest))


def make_records(path: Path, n: int, pool: list[str], seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            cap = CAPTION[: rng.randint(20, len(CAPTION))] * rng.randint(1, 3)
            f.write(json.dumps({"id": f"r{i}", "image": f"pool/{rng.choice(pool)}", "conversations": [
                {"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": cap}]},
                ensure_ascii=False) + "\n")


class TaskPeaks(threading.Thread):
    """Peak RSS of Ray Data task processes (``ray::`` titles naming our operators)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = 0, False
        self.start()

    def run(self) -> None:
        while not self.stop:
            for p in psutil.process_iter(["cmdline"]):
                title = " ".join(p.info["cmdline"] or [])
                if title.startswith("ray::") and ("MapBatches" in title or "Write" in title):
                    with contextlib.suppress(psutil.Error):  # exited meanwhile
                        self.peak = max(self.peak, p.memory_info().rss)
            time.sleep(0.05)


def preprocess_corpus(work: Path, n: int, demo: Path) -> dict:
    from medvl.data.preprocess import PreprocessConfig, preprocess

    make_records(work / f"r{n}.jsonl", n, sorted(os.listdir(work / "pool")))
    cfg = PreprocessConfig(data=str(work / f"r{n}.jsonl"), image_root=str(work), output=str(work / f"s{n}"),
                           template="plain", tokenizer=str(demo / "tokenizer"), image_size=336,
                           num_image_tokens=576, max_length=2048)
    peaks = TaskPeaks()
    t0 = time.perf_counter()
    m = preprocess(cfg)
    peaks.stop = True
    pool_bytes = {f: (work / "pool" / f).stat().st_size for f in os.listdir(work / "pool")}
    with open(cfg.data) as f:
        source = np.mean([pool_bytes[json.loads(line)["image"].split("/")[1]] for line in f])
    shards = sum((work / f"s{n}" / s).stat().st_size for s in m["shards"])
    return {"n": n, "s": time.perf_counter() - t0, "kept": m["records_kept"], "task_peak": peaks.peak,
            "declared": cfg.task_memory_mb << 20, "shard_per_record": shards / m["records_kept"],
            "source_per_record": float(source)}


def pixel_formats(data: Path) -> dict:
    """Raw vs PNG vs JPEG-95 for 128 stored 336-px images: bytes and one-core decode rate."""
    import pyarrow.parquet as pq
    from PIL import Image

    pixels = pq.read_table(data / "shards", columns=["pixels"])["pixels"].to_pylist()[:128]
    out = {"raw": (float(np.mean([len(p) for p in pixels])), float("inf"))}
    for name, kw in (("PNG", {"format": "PNG"}), ("JPEG q95", {"format": "JPEG", "quality": 95})):
        blobs = []
        for p in pixels:
            buf = io.BytesIO()
            Image.fromarray(np.frombuffer(p, np.uint8).reshape(336, 336, 3)).save(buf, **kw)
            blobs.append(buf.getvalue())
        t0 = time.perf_counter()
        for b in blobs:
            np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
        out[name] = (float(np.mean([len(b) for b in blobs])), len(blobs) / (time.perf_counter() - t0))
    return out


def warm() -> None:
    """Start Ray Data's task workers, so first-batch times are the feed's, not process start-up."""
    import ray

    ray.data.range(64, override_num_blocks=4).map_batches(lambda b: b).materialize()


def feed_probe(data: str, tokenizer: str) -> dict:
    """(In a process pinned to one core.) Rank 0's feed: first batch, resume, bytes, rate."""
    import ray

    from medvl.tokenizer import load
    from medvl.train.config import TrainConfig
    from medvl.train.feed import FeedCollate, rank_feed
    from medvl.train.trainer import feed_plan, read_manifest

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = TrainConfig(data=data, num_workers=WORLD, batch_size=SHARE)
    plan = feed_plan(cfg, read_manifest(data))
    collate = FeedCollate(load(tokenizer).pad_token_id, 336)

    def first(start: int):
        t0 = time.perf_counter()
        it = iter(rank_feed(plan, 0, start).iter_torch_batches(batch_size=SHARE, prefetch_batches=2,
                                                               collate_fn=collate))
        batch = next(it)
        return time.perf_counter() - t0, batch, it

    for _ in range(2):  # the first pass imports the feed in Ray Data's worker: warm-up
        resume_s, _, it = first(plan.steps - 1)  # the last window: a few steps, drained
        for _ in it:
            pass
    first_s, batch, it = first(0)
    read, rows, times = int(batch["read_bytes"]), SHARE, []
    for batch in it:
        read += int(batch["read_bytes"])
        rows += len(batch["order"])
        times.append((time.perf_counter(), len(batch["order"])))
    steady = times[len(times) // 4:]  # past the first windows' start-up
    rate = sum(n for _, n in steady[1:]) / (steady[-1][0] - steady[0][0]) if len(steady) > 2 else float("nan")
    shard_bytes = sum(os.path.getsize(os.path.join(data, s)) for s in read_manifest(data)["shards"])
    share = shard_bytes * rows / sum(plan.shard_rows)
    ray.shutdown()
    return {"first_s": first_s, "resume_s": resume_s, "read_ratio": read / share, "rate": rate, "rows": rows}


def old_feed_probe(data: str) -> dict:
    """(Run on the older checkout.) The old feed: rank 0's first batch after read-all + sort."""
    import ray

    from medvl.train.config import TrainConfig
    from medvl.train.trainer import rank_datasets

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    warm()
    t0 = time.perf_counter()
    datasets, _ = rank_datasets(TrainConfig(data=data, num_workers=WORLD, batch_size=SHARE))
    next(iter(datasets["rank0"].iter_batches(batch_size=SHARE)))
    return {"first_s": time.perf_counter() - t0, "read_ratio": float(WORLD)}  # read_parquet of all shards


def driver_probe(path: str, output: str, before: bool) -> dict:
    """Peak RSS growth of the preprocess driver's record pass over ``path``."""
    me = psutil.Process()
    base = peak = me.memory_info().rss
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, me.memory_info().rss)
            time.sleep(0.005)

    threading.Thread(target=watch, daemon=True).start()
    if before:
        from medvl.data.preprocess import read_raw_records

        read_raw_records(path)
    else:
        from medvl.data.sources import open_records

        open_records(path, output, 1024)
    done.set()
    return {"growth": max(peak, me.memory_info().rss) - base}


def probe(kind: str, *args: str, code: str = "", cores: str = "", timeout: int = 1800) -> dict:
    env = {**os.environ, "PYTHONPATH": code or str(ROOT)}
    script = str(ROOT / "benchmarks" / "scale.py")
    cmd = (["taskset", "-c", cores] if cores else []) + [sys.executable, script, "--probe", kind, *args]
    # Ray puts the driver's working directory first on its workers' path: run in the checkout.
    try:
        out = subprocess.run(cmd, env=env, cwd=code or ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout} s"}
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def text_corpus(work: Path, n: int) -> tuple[Path, Path]:
    jsonl, arr = work / "text580k.jsonl", work / "text580k.json"
    if not jsonl.exists():
        make_records(jsonl, n, [f"{i:03d}.jpg" for i in range(256)])
        with open(jsonl) as src, open(arr, "w") as dst:
            dst.write("[" + ",\n".join(line.rstrip("\n") for line in src) + "]")
    return jsonl, arr


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def run(args: argparse.Namespace) -> None:
    import ray

    from medvl.data.demo import build_demo_data

    work, n = Path(args.workdir).resolve(), args.n
    work.mkdir(parents=True, exist_ok=True)
    demo = work / "demo"
    if not (demo / "tokenizer").exists():
        build_demo_data(str(demo), variants=2)
    make_pool(demo, work / "pool")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    pre = [preprocess_corpus(work, k, demo) for k in (n, 10 * n)]
    ray.shutdown()
    formats = pixel_formats(work / f"s{n}")
    feed = [probe("feed", str(work / f"s{k}"), str(demo / "tokenizer"), cores="0") for k in (n, 10 * n)]
    jsonl, arr = text_corpus(work, 580_014)
    drivers = [probe("driver", str(p), str(work / "converted"), "") for p in (jsonl, arr)]
    old_feed = old_drivers = None
    if args.before:
        old_feed = [probe("oldfeed", str(work / f"s{k}"), code=args.before, timeout=900) for k in (n, 10 * n)]
        old_drivers = [probe("driver", str(p), "", "before", code=args.before) for p in (jsonl, arr)]
    table(n, pre, formats, feed, drivers, old_feed, old_drivers)


def table(n, pre, formats, feed, drivers, old_feed, old_drivers) -> None:
    def mb(d: dict) -> str:
        return f"{d['growth'] / 2**20:.0f} MB" if "growth" in d else d["error"][:40]

    def old(rows, i, key, fmt) -> str:
        return fmt(rows[i][key]) if rows and key in rows[i] else "-"

    print(f"\nData at scale: N={n} and 10N={10 * n} records at 336 px; feed: rank 0 of {WORLD}, {SHARE} rows/step")
    print(f"{'':<58}{'before':>14}{'now':>14}  target")
    rows = []
    for i, name in enumerate(("JSONL", "JSON array")):
        growth = drivers[i].get("growth", float("inf"))
        rows.append((f"preprocess driver peak RSS growth, 580k {name}", old(old_drivers, i, "growth", lambda g: f"{g / 2**20:.0f} MB"),
                     mb(drivers[i]), "<=1 GB", verdict(growth <= 2**30)))
    for p in pre:
        rows.append((f"peak preprocess task RSS / declared memory ({p['n']})", "-",
                     f"{p['task_peak'] / 2**20:.0f}/{p['declared'] / 2**20:.0f} MB", "<=1",
                     verdict(p["task_peak"] <= p["declared"])))
    p = pre[1]
    rows.append(("shard bytes per record / source image bytes", "-",
                 f"{p['shard_per_record'] / p['source_per_record']:.2f}", "", ""))
    rows.append(("  shard KB per record (raw uint8 pixels)", "-", f"{p['shard_per_record'] / 1e3:.0f}", "", ""))
    for name, (size, rate) in formats.items():
        if name != "raw":
            rows.append((f"  pixels as {name}: KB per image, decodes/s (1 core)", "-",
                         f"{size / 1e3:.0f}, {rate:.0f}", "", ""))
    for i, k in enumerate((n, 10 * n)):
        rows.append((f"bytes read by rank 0 / its share of the shards ({k})",
                     old(old_feed, i, "read_ratio", lambda r: f"{r:.2f}"),
                     f"{feed[i].get('read_ratio', float('nan')):.2f}", "<=1.2",
                     verdict(feed[i].get("read_ratio", 9) <= 1.2)))
    for i, k in enumerate((n, 10 * n)):
        rows.append((f"time to first batch, s ({k})", old(old_feed, i, "first_s", lambda s: f"{s:.1f}"),
                     f"{feed[i].get('first_s', float('nan')):.1f}", "", ""))
    ratio = feed[1].get("first_s", 1e9) / feed[0].get("first_s", 1e-9)
    old_ratio = (f"{old_feed[1]['first_s'] / old_feed[0]['first_s']:.2f}"
                 if old_feed and all("first_s" in o for o in old_feed) else "-")
    rows.append(("time to first batch, 10N / N", old_ratio, f"{ratio:.2f}", "<=1.3", verdict(ratio <= 1.3)))
    res = feed[1].get("resume_s", 1e9) / feed[1].get("first_s", 1e-9)
    rows.append(("first batch after a resume at the last step / at step 0", "-", f"{res:.2f}", "<=1.3",
                 verdict(res <= 1.3)))
    rate = feed[1].get("rate", 0.0)
    rows.append(("steady feed rate, samples/s per worker on one core", "-", f"{rate:.0f}", ">=200",
                 verdict(rate >= 200)))
    for label, before, now, target, v in rows:
        print(f"{label:<58}{before:>14}{now:>14}  {target:<7}{v}".rstrip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2048, help="records in the small corpus (10x in the big one)")
    ap.add_argument("--workdir", default="benchmarks/out/scale")
    ap.add_argument("--before", default="", help="an older medvl checkout for today's figures")
    ap.add_argument("--probe", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        kind, *rest = args.probe
        fn = {"feed": feed_probe, "oldfeed": old_feed_probe,
              "driver": lambda path, out, mode="": driver_probe(path, out, mode == "before")}[kind]
        print(json.dumps(fn(*rest)))
        return
    run(args)


if __name__ == "__main__":
    main()
