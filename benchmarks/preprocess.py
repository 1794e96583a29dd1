"""Preprocessing benchmark, one run, printed as a table.

(a) The Ray Data pipeline (``medvl.data.preprocess``) against a plain single-process loop
    doing the same work (same per-record function, same Parquet output) on >=2000
    mixed-size JPEG / PNG / DICOM images. Target: >=1.6x on 2 cores.
(b) Our per-image transform (``images.fit``) against LLaVA's own path (PIL
    ``expand2square`` + transformers' ``CLIPImageProcessor``) on one core, from the same
    decoded image, checking they produce the same pixels (mean |diff| <=0.5, max <=2).
    Target: >=2x.

Usage: python benchmarks/preprocess.py [--images 2000] [--workdir benchmarks/out/pre]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from medvl.data import images
from medvl.data.demo import GROUPS, find_dicom_files, train_tokenizer
from medvl.data.preprocess import PreprocessConfig, preprocess, process_one


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=336)
    ap.add_argument("--workdir", default="benchmarks/out/preprocess")
    args = ap.parse_args()
    root = Path(args.workdir)
    shutil.rmtree(root, ignore_errors=True)
    make_corpus(root, args.images)
    cfg = PreprocessConfig(data=str(root / "data.jsonl"), image_root=str(root / "images"),
                           tokenizer=str(root / "tokenizer"), image_size=args.size,
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
    tr = bench_transform(root, args.size)
    print(f"\n(b) per-image transform to {args.size}px, {tr['n']} images, one core")
    print(f"{'path':<28}{'seconds':>10}{'images/s':>12}")
    print(f"{'LLaVA expand2square+CLIP':<28}{tr['llava_s']:>10.2f}{tr['n'] / tr['llava_s']:>12.1f}")
    print(f"{'medvl images.fit':<28}{tr['ours_s']:>10.2f}{tr['n'] / tr['ours_s']:>12.1f}")
    speedup = tr["llava_s"] / tr["ours_s"]
    print(f"{'speed-up (target >=2x)':<28}{speedup:>10.2f}x  {verdict(speedup >= 2)}")
    same = tr["mean_abs_diff"] <= 0.5 and tr["max_abs_diff"] <= 2
    print(f"pixels: mean |diff| {tr['mean_abs_diff']:.4f} (<=0.5), max |diff| {tr['max_abs_diff']} (<=2)  "
          f"{verdict(same)}")


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


if __name__ == "__main__":
    main()
