"""``medvl preprocess``: LLaVA-format records + images -> Parquet shards, on Ray Data.

read records -> validate -> tokenize (cheap, first) -> decode/fit image -> write. Each
write task sends its kept rows to one Parquet shard and its rejected rows, with reasons,
back to the driver, which writes ``rejects.jsonl`` and ``manifest.json``. Every input
record ends in exactly one of the two: ``records_in == records_kept + records_rejected``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import ray

from medvl import config, storage
from medvl.data import images, records, templates
from medvl.data.tokenize import IGNORE, count_tokens, encode_segments
from medvl.data.writer import ROW_SCHEMA, ShardSink
from medvl.tokenizer import load as load_tokenizer


@dataclass
class PreprocessConfig:
    data: str = field(default="", metadata={"help": "records: a .json array or .jsonl file (URI)"})
    image_root: str = field(default="", metadata={"help": "directory the records' image paths are relative to (URI)"})
    output: str = field(default="", metadata={"help": "output directory (URI): shards/, rejects.jsonl, manifest.json"})
    template: Literal["plain", "v1", "chatml"] = field(default="v1", metadata={"help": "conversation template"})
    tokenizer: str = field(default="", metadata={"help": "HF tokenizer directory (URI)"})
    image_size: int = field(default=336, metadata={"help": "vision tower input size in pixels"})
    num_image_tokens: int = field(default=576, metadata={"help": "positions the image occupies in the sequence"})
    max_length: int = field(default=2048, metadata={"help": "longest sample in tokens, image included"})
    aspect: Literal["pad", "crop"] = field(default="pad", metadata={"help": "pad: expand to square with CLIP mean; crop: centre crop"})
    overflow: Literal["reject", "truncate"] = field(default="reject", metadata={"help": "over-long samples: reject, or truncate keeping >=1 answer token"})
    max_pixels: int = field(default=50_000_000, metadata={"help": "pixel-bomb guard: larger images are rejected"})
    shard_records: int = field(default=1024, metadata={"help": "records per Parquet shard (upper bound)"})


def _fit_length(ids: list[int], labels: list[int], cfg: PreprocessConfig) -> tuple[list[int], list[int]]:
    if len(ids) <= cfg.max_length:
        return ids, labels
    detail = f"{len(ids)} tokens > max_length={cfg.max_length}"
    if cfg.overflow == "truncate":
        ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
        if any(t != IGNORE for t in labels):
            return ids, labels
        detail += " and truncation would remove every answer token"
    raise records.Reject("too_long", detail)


def process_one(line_no: int, text: str, cfg: PreprocessConfig) -> dict[str, Any]:
    """One raw record -> a kept row or a rejected row (never an exception)."""
    rec_id = f"line-{line_no}"
    try:
        raw = records.parse(text)
        rec_id = records.record_id(raw) or rec_id
        rec = records.validate(raw)
        tok = load_tokenizer(cfg.tokenizer)
        template = templates.get(cfg.template)
        enc = encode_segments(templates.render(rec.turns, template), tok, cfg.num_image_tokens)
        ids, labels = _fit_length(enc.input_ids, enc.labels, cfg)
        uri = records.image_uri(cfg.image_root, rec.image)
        try:
            data = storage.read_bytes(uri)
        except (FileNotFoundError, OSError) as e:
            raise records.Reject("missing_image", f"{rec.image}: {e}") from e
        spec = images.ImageSpec(cfg.image_size, cfg.aspect, cfg.max_pixels)
        pixels = images.load_image(data, rec.image, spec)
    except records.Reject as r:
        return _row(rec_id, line_no, reason=r.reason, detail=r.detail)
    except images.ImageError as e:
        return _row(rec_id, line_no, reason=e.reason, detail=f"{rec.image}: {e.detail}")
    questions = [q.replace(templates.IMAGE, "").strip() for q, _ in rec.turns]
    return _row(
        rec_id, line_no, input_ids=ids, labels=labels, pixels=pixels.tobytes(),
        question_tokens=[count_tokens(q, tok) for q in questions],
        answer_tokens=[count_tokens(a, tok) for _, a in rec.turns],
    )


def _row(rec_id: str, line_no: int, reason: str = "", detail: str = "", input_ids=(), labels=(),
         pixels: bytes = b"", question_tokens=(), answer_tokens=()) -> dict[str, Any]:
    return {
        "id": rec_id, "line": line_no, "reason": reason, "detail": detail,
        "input_ids": list(input_ids), "labels": list(labels), "pixels": pixels,
        "length": len(input_ids), "question_tokens": list(question_tokens),
        "answer_tokens": list(answer_tokens),
    }


def process_batch(batch: dict[str, np.ndarray], cfg: PreprocessConfig) -> pa.Table:
    rows = [process_one(int(n), str(t), cfg) for n, t in zip(batch["line"], batch["text"], strict=True)]
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)




def read_raw_records(uri: str) -> list[dict[str, Any]]:
    """Records as ``{line, text}``: JSONL line by line (a bad line is one reject), or a JSON array."""
    text = storage.read_text(uri)
    if uri.endswith(".jsonl") or not text.lstrip().startswith("["):
        return [{"line": i + 1, "text": t} for i, t in enumerate(text.splitlines()) if t.strip()]
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{uri}: not a valid JSON array ({e}); use .jsonl to isolate bad records") from e
    return [{"line": i + 1, "text": json.dumps(item, ensure_ascii=False)} for i, item in enumerate(items)]


def preprocess(cfg: PreprocessConfig) -> dict[str, Any]:
    """Run the pipeline on the current Ray cluster; return the manifest."""
    for name in ("data", "image_root", "output", "tokenizer"):
        if not getattr(cfg, name):
            raise ValueError(f"preprocess: --{name.replace('_', '-')} is required")
    cfg = dataclasses.replace(cfg, **{k: storage.absolute(getattr(cfg, k))
                                      for k in ("data", "image_root", "output", "tokenizer")})
    if not ray.is_initialized():
        ray.init()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deterministic shards
    raw = read_raw_records(cfg.data)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    blocks = max(1, min(len(raw), max(2 * cpus, math.ceil(len(raw) / cfg.shard_records))))
    storage.delete_dir(storage.join(cfg.output, "shards"))
    sink = ShardSink(cfg.output, records_in=len(raw), run_config=config.to_dict(cfg),
                     plain=cfg.template == "plain")
    ds = ray.data.from_items(raw, override_num_blocks=blocks)
    ds = ds.map_batches(process_batch, fn_kwargs={"cfg": cfg}, batch_format="numpy", batch_size=None)
    ds.write_datasink(sink)
    return sink.manifest
