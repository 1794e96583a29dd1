"""Which split was evaluated: a content hash two teams can compare before comparing scores.

The hash covers every question's id, question, answer and the SHA-256 of its image file's
bytes, one line per question, sorted (so record order does not matter, any changed word
or pixel does). ``medvl import-vqa`` stores it beside the records with the counts and the
release files it read; ``medvl eval`` recomputes it and prints both.
"""

from __future__ import annotations

import hashlib
import json

from medvl import storage
from medvl.data import records


def sidecar(data: str) -> str:
    """``x.jsonl`` -> ``x.provenance.json``: where ``import-vqa`` records the split's provenance."""
    return (data[: -len(".jsonl")] if data.endswith(".jsonl") else data) + ".provenance.json"


def split_hash(examples: list[dict], image_root: str) -> dict:
    """SHA-256 over the questions (``id``, ``question``, ``answer``, ``image``: eval examples)
    and their images' bytes; with the counts. A missing image hashes as ``missing``."""
    digests: dict[str, str] = {}
    for path in sorted({ex["image"] for ex in examples}):
        try:
            digests[path] = hashlib.sha256(storage.read_bytes(records.image_uri(image_root, path))).hexdigest()
        except (OSError, records.Reject):
            digests[path] = "missing"
    lines = sorted(json.dumps([ex["id"], ex["question"], ex["answer"], digests[ex["image"]]], ensure_ascii=False)
                   for ex in examples)
    return {"sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest(), "questions": len(examples),
            "images": len(digests), "missing_images": sum(d == "missing" for d in digests.values())}


def read_imported(data: str) -> dict | None:
    """The provenance ``import-vqa`` wrote beside ``data``, if it did."""
    path = sidecar(data)
    return json.loads(storage.read_text(path)) if storage.exists(path) else None
