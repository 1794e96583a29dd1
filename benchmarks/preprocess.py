"""Preprocessing benchmark, one run, printed as a table.

(a) The Ray Data pipeline (``medvl.data.preprocess``) against a plain single-process loop
    doing the same work (same per-record function, same Parquet output) on >=2000
    mixed-size JPEG / PNG / DICOM images. Target: >=1.6x on 2 cores.
(b) Our per-image transform (``images.fit``) against LLaVA's own path (PIL
    ``expand2square`` + transformers' ``CLIPImageProcessor``) on one core, from the same
    decoded image, checking they produce the same pixels (mean |diff| <=0.5, max <=2).
    Target: >=2x.
(c) Map-task concurrency on a node larger than this one, rehearsed with Ray's logical
    resources (``--cpus 16`` CPUs, and the memory such a node gives Ray, on this machine's
    cores): the most ``process_*`` map tasks running at once, from Ray's task table
    (``ray.util.state.list_tasks``: each task's start and end), over a corpus of
    ``--records`` (16 chunks of today's 1024 lines), cheap 100-300 px images. Target: >=90%
    of the CPUs. ``--before DIR`` measures an older checkout first (e.g. a ``git worktree``
    of the previous commit). Unlike (a) it does not depend on the machine being idle.

Usage: python benchmarks/preprocess.py [--images 2000] [--workdir benchmarks/out/pre]
       [--parts abc] [--cpus 16] [--records 16384] [--before DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from medvl.data import images
from medvl.data.demo import GROUPS, find_dicom_files, train_tokenizer
from medvl.data.preprocess import PreprocessConfig, preprocess, process_one

ROOT = Path(__file__).resolve().parent.parent
MAP_TASK = "MapBatches(process_"  # the map operator's tasks, alone or fused with the read and the write
NODE_MEMORY_PER_CPU = 0.7 * 4 * 2**30  # what Ray gives tasks on a 4 GiB-per-vCPU node (m6i; 30% object store)


def make_corpus(root: Path, n: int, seed: int = 0) -> Path:
    """n records over JPEG, PNG (synthetic, 200-1600 px, any aspect) and real DICOM files."""
    rng = random.Random(seed)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    dicoms = find_dicom_files()
    dicom_names = [f for names in GROUPS.values() for f in names if f in dicoms]
    textures = [_texture(1600, 1600, k) for k in range(8)]  # crops of these: fast to make
    lines = []
    for i in range(n):
        kind = ("jpg", "png", "dcm")[i % 3]
        if kind == "dcm":
            name = f"{i:05d}.dcm"
            shutil.copyfile(dicoms[dicom_names[i % len(dicom_names)]], img_dir / name)
        else:
            w, h = rng.randint(200, 1600), rng.randint(200, 1600)
            x, y = rng.randint(0, 1600 - w), rng.randint(0, 1600 - h)
            name = f"{i:05d}.{kind}"
            Image.fromarray(textures[i % 8][y:y + h, x:x + w]).save(img_dir / name, quality=90)
        q, a = "这是什么检查？请描述所见。", "图像显示未见明显异常，建议结合临床。"
        lines.append(json.dumps({"id": str(i), "image": name, "conversations": [
            {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]},
            ensure_ascii=False))
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    train_tokenizer([q, a], str(root / "tokenizer"), vocab_size=500)
    return root


def _texture(w: int, h: int, seed: int) -> np.ndarray:
    """Smooth structure plus noise, so JPEG/PNG decode costs what real photos cost."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = (np.sin(xx / rng.uniform(5, 50)) + np.cos(yy / rng.uniform(5, 50))) * 60 + 128
    return np.clip(base[..., None] + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)


def plain_loop(cfg: PreprocessConfig) -> float:
    """The same work in one process: per-record function, then one Parquet file."""
    from medvl.data.writer import ROW_SCHEMA

    t0 = time.perf_counter()
    with open(cfg.data) as f:  # JSONL
        rows = [process_one(n, line, cfg) for n, line in enumerate(f, 1) if line.strip()]
    os.makedirs(cfg.output, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), f"{cfg.output}/all.parquet")
    return time.perf_counter() - t0


def llava_transform(img: Image.Image, processor) -> np.ndarray:
    """LLaVA-1.5's path on an RGB image (``expand2square`` + CLIP processor), as uint8 HWC."""
    w, h = img.size
    side = max(w, h)
    if w != h:
        canvas = Image.new(img.mode, (side, side), images.PAD_COLOR)
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        img = canvas
    x = processor(img, return_tensors="np")["pixel_values"][0]  # 3xHxW float, normalised
    mean, std = np.asarray(images.CLIP_MEAN)[:, None, None], np.asarray(images.CLIP_STD)[:, None, None]
    return np.clip(np.round((x * std + mean) * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def bench_transform(root: Path, size: int) -> dict:
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    t_ours = t_llava = 0.0
    diffs = []
    names = sorted(os.listdir(root / "images"))
    for name in names:  # one image in memory at a time; both paths timed on the same image
        img = images.decode((root / "images" / name).read_bytes(), name, images.ImageSpec(max_pixels=10**9))
        rgb = img.convert("RGB")  # LLaVA opens every image as RGB (not timed)
        t0 = time.perf_counter()
        ours = images.fit(img, size, "pad")
        t1 = time.perf_counter()
        theirs = llava_transform(rgb, processor)
        t_llava += time.perf_counter() - t1
        t_ours += t1 - t0
        d = np.abs(ours.astype(int) - theirs.astype(int))
        diffs.append((d.mean(), d.max()))
    return {"n": len(names), "ours_s": t_ours, "llava_s": t_llava,
            "mean_abs_diff": float(np.mean([m for m, _ in diffs])),
            "max_abs_diff": int(max(x for _, x in diffs))}


def map_task_spans(dashboard: str, timeout_s: float = 60) -> list[tuple[float, float]]:
    """(start, end) in seconds of every finished map task in Ray's task table, once no map
    task is left without an end (task events reach the table a little after the task)."""
    from ray.util.state import list_tasks

    deadline = time.time() + timeout_s
    while True:
        tasks = [t for t in list_tasks(address=dashboard, detail=True, limit=10_000, raise_on_missing_output=False)
                 if MAP_TASK in t.name]
        if all(t.end_time_ms for t in tasks) or time.time() > deadline:
            return sorted((t.start_time_ms / 1e3, t.end_time_ms / 1e3) for t in tasks
                          if t.start_time_ms and t.end_time_ms)
        time.sleep(1)


def peak_running(spans: list[tuple[float, float]]) -> int:
    """The most spans open at one instant (one ending as another starts counts once)."""
    edges = sorted([(end, -1) for _, end in spans] + [(start, 1) for start, _ in spans])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def concurrency_corpus(root: Path, records: int) -> Path:
    """``records`` records over 64 small images: cheap work, so the row measures scheduling."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(64):
        names.append(f"{i:03d}.{('jpg', 'png')[i % 2]}")
        w, h = rng.integers(100, 300, 2)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / names[-1])
    q, a = "这是什么检查？", "未见明显异常。"
    with open(root / "data.jsonl", "w") as f:
        for i in range(records):
            f.write(json.dumps({"id": str(i), "image": names[i % 64], "conversations": [
                {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]}, ensure_ascii=False) + "\n")
    train_tokenizer([q, a], str(root / "tokenizer"), vocab_size=500)
    return root


def concurrency_probe(root: str, cpus: int) -> dict:
    """In its own process (the code under test on PYTHONPATH): preprocess ``root``'s corpus on
    a Ray with ``cpus`` logical CPUs and read the map tasks' spans from its task table."""
    import ray

    ctx = ray.init(num_cpus=cpus, _memory=int(cpus * NODE_MEMORY_PER_CPU), include_dashboard=True,
                   log_to_driver=False)
    r = Path(root)
    t0 = time.perf_counter()
    manifest = preprocess(PreprocessConfig(data=str(r / "data.jsonl"), image_root=str(r / "images"),
                                           tokenizer=str(r / "tokenizer"), output=str(r / "out"), image_size=32,
                                           num_image_tokens=16, max_length=256))
    wall = time.perf_counter() - t0
    spans = map_task_spans(f"http://{ctx.dashboard_url}")
    ray.shutdown()
    return {"records": manifest["records_in"], "tasks": len(spans), "peak": peak_running(spans), "wall": wall}


def bench_concurrency(work: Path, cpus: int, records: int, before: str) -> None:
    root = concurrency_corpus(work / "concurrency", records)
    print(f"\n(c) map tasks running at once, {records} records, {cpus} logical CPUs "
          f"({NODE_MEMORY_PER_CPU * cpus / 2**30:.0f} GiB task memory), on this machine's {os.cpu_count()} cores")
    print(f"{'code':<28}{'map tasks':>10}{'at once':>10}{'of CPUs':>10}{'seconds':>10}")
    for name, code in ([("before (--before)", before)] if before else []) + [("this checkout", str(ROOT))]:
        # Ray puts the driver's working directory first on its workers' path: run in the checkout.
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--probe", str(root), str(cpus)], cwd=code,
                             env={**os.environ, "PYTHONPATH": code, "RAY_AUTH_MODE": "disabled"},
                             capture_output=True, text=True, timeout=3600)
        if out.returncode:
            print(f"{name:<28}failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        share = r["peak"] / cpus
        print(f"{name:<28}{r['tasks']:>10}{r['peak']:>10}{share:>9.0%}{r['wall']:>10.1f}  "
              + (verdict(share >= 0.9) + " (target >=90%)" if code == str(ROOT) else ""), flush=True)


def bench_pipeline(root: Path, size: int) -> None:
    """(a): a wall-clock ratio, meaningful only on an idle machine."""
    cfg = PreprocessConfig(data=str(root / "data.jsonl"), image_root=str(root / "images"),
                           tokenizer=str(root / "tokenizer"), image_size=size,
                           num_image_tokens=16, max_length=256, max_pixels=10**8)
    import ray

    ray.init(include_dashboard=False, log_to_driver=False)  # every CPU of this machine
    cpus = int(ray.cluster_resources()["CPU"])
    preprocess(PreprocessConfig(**{**cfg.__dict__, "output": str(root / "warm")}))  # warm workers
    t0 = time.perf_counter()
    manifest = preprocess(PreprocessConfig(**{**cfg.__dict__, "output": str(root / "ray")}))
    t_ray = time.perf_counter() - t0
    ray.shutdown()
    t_loop = plain_loop(PreprocessConfig(**{**cfg.__dict__, "output": str(root / "loop")}))
    n = manifest["records_in"]
    print(f"\n(a) pipeline, {n} images ({manifest['records_kept']} kept), {cpus} CPUs")
    print(f"{'path':<28}{'seconds':>10}{'images/s':>12}")
    print(f"{'plain loop (1 process)':<28}{t_loop:>10.2f}{n / t_loop:>12.1f}")
    print(f"{'Ray Data pipeline':<28}{t_ray:>10.2f}{n / t_ray:>12.1f}")
    print(f"{'speed-up (target >=1.6x)':<28}{t_loop / t_ray:>10.2f}x  {verdict(t_loop / t_ray >= 1.6)}", flush=True)


def print_transform(root: Path, size: int) -> None:
    """(b): one core, both paths timed on the same decoded images."""
    tr = bench_transform(root, size)
    print(f"\n(b) per-image transform to {size}px, {tr['n']} images, one core")
    print(f"{'path':<28}{'seconds':>10}{'images/s':>12}")
    print(f"{'LLaVA expand2square+CLIP':<28}{tr['llava_s']:>10.2f}{tr['n'] / tr['llava_s']:>12.1f}")
    print(f"{'medvl images.fit':<28}{tr['ours_s']:>10.2f}{tr['n'] / tr['ours_s']:>12.1f}")
    speedup = tr["llava_s"] / tr["ours_s"]
    print(f"{'speed-up (target >=2x)':<28}{speedup:>10.2f}x  {verdict(speedup >= 2)}")
    same = tr["mean_abs_diff"] <= 0.5 and tr["max_abs_diff"] <= 2
    print(f"pixels: mean |diff| {tr['mean_abs_diff']:.4f} (<=0.5), max |diff| {tr['max_abs_diff']} (<=2)  "
          f"{verdict(same)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=336)
    ap.add_argument("--workdir", default="benchmarks/out/preprocess")
    ap.add_argument("--parts", default="abc", help="which of (a), (b), (c) to run")
    ap.add_argument("--cpus", type=int, default=16, help="(c): logical CPUs of the rehearsed node")
    ap.add_argument("--records", type=int, default=16384, help="(c): records (16 chunks of 1024 lines)")
    ap.add_argument("--before", default="", help="(c): an older medvl checkout, measured first")
    ap.add_argument("--probe", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        print(json.dumps(concurrency_probe(args.probe[0], int(args.probe[1]))))
        return
    root = Path(args.workdir).resolve()
    shutil.rmtree(root, ignore_errors=True)
    if "a" in args.parts or "b" in args.parts:
        make_corpus(root, args.images)
    if "a" in args.parts:
        bench_pipeline(root, args.size)
    if "b" in args.parts:
        print_transform(root, args.size)
    if "c" in args.parts:
        bench_concurrency(root, args.cpus, args.records, str(Path(args.before).resolve()) if args.before else "")


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


if __name__ == "__main__":
    main()
