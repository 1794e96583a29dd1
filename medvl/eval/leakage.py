"""Were the eval images trained on? PMC-derived training and test sets overlap, so before a
score is believed the eval images are compared with the training corpus's images.

Two fingerprints per image, computed on Ray Data (the corpus can be ChiMed-VL's 580k):

- ``sha256`` of the decoded pixels (mode, size and bytes): the same picture saved in another
  lossless container or with other metadata still matches;
- a 64-bit DCT perceptual hash (pHash: greyscale, 32x32, the 8x8 lowest frequencies against
  their median), which survives resizing and JPEG re-encoding; two images whose hashes differ
  in at most ``PHASH_BITS`` bits are reported as near duplicates.
"""

from __future__ import annotations

import hashlib

import numpy as np
import ray
from PIL import Image

from medvl import storage
from medvl.data import images, records
from medvl.data.limits import ImageError, ImageSpec

# Of 64 bits. Measured on the demo's 103 images of 32 px and more: copies resized x0.5-1.5 and
# re-encoded as JPEG q60-90 differ by 0-8 bits (254 of 309 by 0); other pairs by 12 or more
# (median 32), except the same scan in other encodings or series neighbours. Below ~32 px
# pHash cannot resolve anything: a resized 10 px thumbnail is not found.
PHASH_BITS = 8
_N = 32
_DCT = np.cos(np.pi * (2 * np.arange(_N)[None, :] + 1) * np.arange(_N)[:, None] / (2 * _N))  # DCT-II rows


def phash(img: Image.Image) -> int:
    """64-bit DCT perceptual hash of a PIL image (imagehash's ``phash`` recipe, in numpy)."""
    small = np.asarray(img.convert("L").resize((_N, _N), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT @ small @ _DCT.T)[:8, :8]
    bits = (low > np.median(low)).ravel()
    return int(np.packbits(bits).view(">u8")[0])


def fingerprint(data: bytes, name: str) -> tuple[str, int]:
    """(SHA-256 of the decoded pixels, pHash) of an image file's bytes."""
    img = images.decode(data, name, ImageSpec())
    head = f"{img.mode}:{img.size[0]}x{img.size[1]}:".encode()
    return hashlib.sha256(head + img.tobytes()).hexdigest(), phash(img)


def _fingerprints(batch: dict[str, np.ndarray], root: str) -> dict[str, list]:
    out: dict[str, list] = {"image": [], "sha256": [], "phash": []}
    for rel in batch["image"]:
        try:
            s, p = fingerprint(storage.read_bytes(records.image_uri(root, rel)), rel)
        except (OSError, ImageError, records.Reject):
            continue  # unreadable: nothing to match (the eval lists its own errors)
        out["image"].append(str(rel))
        out["sha256"].append(s)
        out["phash"].append(p)
    return {**out, "phash": np.array(out["phash"], dtype=np.uint64)}


def corpus_images(uri: str) -> list[str]:
    """The distinct image paths a records file (.jsonl) names."""
    rows = (records.parse(line) for line in storage.read_text(uri).splitlines() if line.strip())
    return sorted({r["image"] for r in rows if r.get("image")})


def fingerprints(paths: list[str], root: str, batch_size: int = 64) -> ray.data.Dataset:
    """One row per readable image: ``image``, ``sha256``, ``phash`` (uint64)."""
    ds = ray.data.from_items([{"image": p} for p in paths], override_num_blocks=max(1, len(paths) // 512))
    return ds.map_batches(_fingerprints, batch_size=batch_size, fn_kwargs={"root": root})


_BITS = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)  # set bits of each byte value


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64, by byte lookup: 8 bytes per hash in flight, where unpacking
    to bits took 64 (4096 training x 2,000 eval hashes: 66 MB, not 525 MB, per task)."""
    return _BITS[x.view(np.uint8).reshape(*x.shape, 8)].sum(axis=-1, dtype=np.int64)


def _matches(batch: dict[str, np.ndarray], eval_rows: list[dict]) -> dict[str, list]:
    """Every (eval image, training image) pair in this batch that is exact or within PHASH_BITS."""
    ev = np.array([r["phash"] for r in eval_rows], dtype=np.uint64)
    dist = _popcount(np.bitwise_xor(batch["phash"].astype(np.uint64)[:, None], ev[None, :]))  # train x eval
    out: dict[str, list] = {"eval_image": [], "train_image": [], "kind": [], "bits": []}
    for i, j in zip(*np.nonzero(dist <= PHASH_BITS), strict=True):
        exact = batch["sha256"][i] == eval_rows[j]["sha256"]
        out["eval_image"].append(eval_rows[j]["image"])
        out["train_image"].append(str(batch["image"][i]))
        out["kind"].append("exact" if exact else "near")
        out["bits"].append(int(dist[i, j]))
    return out


def find_overlaps(eval_images: list[str], eval_root: str, train_records: str, train_root: str) -> list[dict]:
    """Eval images that appear in the training corpus: ``eval_image``, ``train_image``,
    ``kind`` (exact pixels / near duplicate) and the pHash distance in bits."""
    ev = fingerprints(eval_images, eval_root).take_all()
    train = fingerprints(corpus_images(train_records), train_root)
    found = train.map_batches(_matches, batch_size=4096, fn_kwargs={"eval_rows": ev}).take_all()
    return sorted(found, key=lambda r: (r["eval_image"], r["bits"], r["train_image"]))
