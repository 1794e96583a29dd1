"""Which split was evaluated: a content hash two teams can compare before comparing scores.

The hash covers every question's id, question, answer and the SHA-256 of its image file's
bytes, one line per question, sorted (so record order does not matter, any changed word
or pixel does). ``medvl import-vqa`` stores it beside the records with the counts and the
release files it read; ``medvl eval`` recomputes it and prints both.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

from medvl import storage
from medvl.data import records
from medvl.data.preprocess import FETCH_THREADS


def sidecar(data: str) -> str:
    """``x.jsonl`` -> ``x.provenance.json``: where ``import-vqa`` records the split's provenance."""
    return (data[: -len(".jsonl")] if data.endswith(".jsonl") else data) + ".provenance.json"


def split_hash(examples: list[dict], image_root: str) -> dict:
    """SHA-256 over the questions (``id``, ``question``, ``answer``, ``image``: eval examples)
    and their images' bytes; with the counts. A missing image hashes as ``missing``."""
    paths = sorted({ex["image"] for ex in examples})
    with ThreadPoolExecutor(FETCH_THREADS) as pool:  # S3 latency, not bandwidth, bounds one at a time
        digests = dict(zip(paths, pool.map(lambda p: _image_digest(image_root, p), paths), strict=True))
    lines = sorted(json.dumps([ex["id"], ex["question"], ex["answer"], digests[ex["image"]]], ensure_ascii=False)
                   for ex in examples)
    return {"sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest(), "questions": len(examples),
            "images": len(digests), "missing_images": sum(d == "missing" for d in digests.values())}


def _image_digest(image_root: str, path: str) -> str:
    try:
        return hashlib.sha256(storage.read_bytes(records.image_uri(image_root, path))).hexdigest()
    except (OSError, records.Reject):
        return "missing"


def read_imported(data: str) -> dict | None:
    """The provenance ``import-vqa`` wrote beside ``data``, if it did."""
    path = sidecar(data)
    return json.loads(storage.read_text(path)) if storage.exists(path) else None
