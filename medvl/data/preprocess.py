"""``medvl preprocess``: LLaVA-format records + images -> Parquet shards, on Ray Data.

read records (byte ranges of JSONL, ``sources.py``) -> validate -> tokenize (cheap, first)
-> fetch images (concurrently) -> decode/fit -> write, 64 records at a time, one Ray task
per chunk of records (sized from the corpus and the cluster's CPUs). Each task
streams its kept rows into one Parquet shard and sends its rejected rows, with reasons,
back to the driver, which writes ``rejects.jsonl`` and ``manifest.json``. Every input
record ends in exactly one of the two: ``records_in == records_kept + records_rejected``.
Neither the driver nor a task holds more than one chunk of records at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import ray

from medvl import config, storage
from medvl.console import init_ray
from medvl.data import holdout, images, records, templates
from medvl.data.sources import chunk_lines, open_records, read_records
from medvl.data.tokenize import IGNORE, Tokenized, encode_turns
from medvl.data.writer import PARTS, ROW_GROUP_ROWS, ROW_SCHEMA, ShardSink, row_group_rows
from medvl.placement import Placement, cpu_task_options
from medvl.preflight import check_inputs
from medvl.tokenizer import image_token_id
from medvl.tokenizer import load as load_tokenizer

FETCH_THREADS = 16  # concurrent image reads per task


@dataclass
class PreprocessConfig:
    data: str = field(default="", metadata={"help": "records: a .json array or .jsonl file (URI)"})
    image_root: str = field(default="", metadata={"help": "directory the records' image paths are relative to (URI)"})
    output: str = field(default="", metadata={"help": "output directory (URI): shards/, val/, rejects.jsonl, manifest.json"})
    template: Literal["plain", "v1", "chatml"] = field(default="v1", metadata={"help": "conversation template"})
    tokenizer: str = field(default="", metadata={"help": "HF tokenizer directory (URI)"})
    image_size: int = field(default=336, metadata={"help": "vision tower input size in pixels"})
    num_image_tokens: int = field(default=576, metadata={"help": "positions the image occupies in the sequence"})
    max_length: int = field(default=2048, metadata={
        "help": "longest sample as LLaVA's model_max_length counts it: text tokens + 1 per image"})
    aspect: Literal["pad", "crop"] = field(default="pad", metadata={"help": "pad: expand to square with CLIP mean; crop: centre crop"})
    overflow: Literal["reject", "truncate"] = field(default="reject", metadata={"help": "over-long samples: reject, or truncate as LLaVA does (kept if >=1 answer token survives; counted as records_truncated)"})
    max_pixels: int = field(default=50_000_000, metadata={"help": "pixel-bomb guard: larger images are rejected"})
    allow_burned_in_annotation: bool = field(default=False, metadata={
        "help": "keep DICOM images whose BurnedInAnnotation is YES (patient text in the pixels); "
                "default: reject them as burned_in_annotation"})
    rejects_quote_records: bool = field(default=False, metadata={
        "help": "debugging: each rejects.jsonl detail quotes its record's first 120 characters "
                "(copies patient text out of the corpus)"})
    val_fraction: float = field(default=0.0, metadata={
        "help": "share of records held out for the training's validation loss, never trained on: "
                "written to val/, chosen by a hash of the image path (same records on every run); 0: none"})
    shard_records: int = field(default=1024, metadata={"help": "records per Parquet shard (upper bound)"})
    task_memory_mb: int = field(default=1500, metadata={
        "help": "host memory one preprocess task declares to Ray (benchmarks/scale.py measures the peak)"})


def _fit_length(ids: list[int], labels: list[int], image_id: int,
                cfg: PreprocessConfig) -> tuple[list[int], list[int], str]:
    """LLaVA's limit: ``model_max_length`` counts text tokens and one per image (the
    ``<image>`` placeholder, not its ``num_image_tokens`` features), so the stored sequence
    may hold ``num_image_tokens - 1`` more per image. Returns ids, labels and a note when the
    sample was truncated (``overflow: truncate``, as LLaVA does)."""
    images = ids.count(image_id) // cfg.num_image_tokens
    limit = cfg.max_length + images * (cfg.num_image_tokens - 1)
    if len(ids) <= limit:
        return ids, labels, ""
    detail = f"{len(ids) - limit + cfg.max_length} tokens (an image as 1) > max_length={cfg.max_length}"
    if cfg.overflow == "truncate":
        if ids[limit - 1] == image_id:
            detail += " and the cut would split the image"
        elif any(t != IGNORE for t in labels[:limit]):
            return ids[:limit], labels[:limit], f"truncated: {detail}"
        else:
            detail += " and truncation would remove every answer token"
    raise records.Reject("too_long", detail)


@dataclass
class Prepared:
    """A record that passed every check but the image: tokens done, image still to fetch."""

    id: str
    line: int
    image: str  # as the record names it
    uri: str
    tokens: Tokenized
    note: str = ""  # set when the sample was truncated: kept, and counted in the manifest


def prepare(line_no: int, text: str, cfg: PreprocessConfig) -> Prepared | dict[str, Any]:
    """Parse, validate and tokenize (cheap, first): a ``Prepared`` or a rejected row."""
    rec_id = f"line-{line_no}"
    try:
        raw = records.parse(text)
        rec_id = records.record_id(raw) or rec_id
        rec = records.validate(raw)
        tok = load_tokenizer(cfg.tokenizer)
        enc = encode_turns(rec.turns, templates.get(cfg.template), tok, cfg.num_image_tokens)
        enc.input_ids, enc.labels, note = _fit_length(enc.input_ids, enc.labels, image_token_id(tok), cfg)
        return Prepared(rec_id, line_no, rec.image, records.image_uri(cfg.image_root, rec.image), enc, note)
    except records.Reject as r:
        quote = f" (record: {text[:120]!r})" if cfg.rejects_quote_records else ""
        return _row(rec_id, line_no, reason=r.reason, detail=r.detail + quote)


def fetch(uri: str) -> bytes | OSError:
    """An image's bytes, or the error (a reject, not a crash)."""
    try:
        return storage.read_bytes(uri)
    except OSError as e:  # FileNotFoundError included
        return e
    except ValueError as e:  # pyarrow's ArrowInvalid: a path it cannot take (a NUL in it)
        return OSError(f"unreadable path: {e}")


def finish(p: Prepared | dict[str, Any], data: bytes | OSError | None, cfg: PreprocessConfig) -> dict[str, Any]:
    """Decode and fit the image: the kept row, or a rejected one."""
    if not isinstance(p, Prepared):
        return p
    if isinstance(data, OSError):
        return _row(p.id, p.line, reason="missing_image", detail=f"{p.image}: {data}")
    try:
        spec = images.ImageSpec(cfg.image_size, cfg.aspect, cfg.max_pixels, cfg.allow_burned_in_annotation)
        pixels = images.load_image(data, p.image, spec)
    except images.ImageError as e:
        return _row(p.id, p.line, reason=e.reason, detail=f"{p.image}: {e.detail}")
    t = p.tokens
    return _row(p.id, p.line, detail=p.note, input_ids=t.input_ids, labels=t.labels, pixels=pixels.tobytes(),
                question_tokens=t.question_tokens, answer_tokens=t.answer_tokens,
                holdout_key=holdout.holdout_key(p.image, p.id))


def process_one(line_no: int, text: str, cfg: PreprocessConfig) -> dict[str, Any]:
    """One raw record -> a kept row or a rejected row (never an exception)."""
    p = prepare(line_no, text, cfg)
    return finish(p, fetch(p.uri) if isinstance(p, Prepared) else None, cfg)


def _row(rec_id: str, line_no: int, reason: str = "", detail: str = "", input_ids=(), labels=(),
         pixels: bytes = b"", question_tokens=(), answer_tokens=(), holdout_key: str = "") -> dict[str, Any]:
    return {
        "id": rec_id, "line": line_no, "reason": reason, "detail": detail,
        "input_ids": list(input_ids), "labels": list(labels), "pixels": pixels,
        "length": len(input_ids), "question_tokens": list(question_tokens),
        "answer_tokens": list(answer_tokens), "holdout_key": holdout_key,
    }


def process_batch(batch: dict[str, np.ndarray], cfg: PreprocessConfig) -> pa.Table:
    """A small batch (one row group) of records; its images are fetched concurrently (S3
    latency, not bandwidth, bounds a one-at-a-time fetch)."""
    prepared = [prepare(int(n), str(t), cfg) for n, t in zip(batch["line"], batch["text"], strict=True)]
    uris = list(dict.fromkeys(p.uri for p in prepared if isinstance(p, Prepared)))  # QA pairs share images
    with ThreadPoolExecutor(FETCH_THREADS) as pool:
        fetched = dict(zip(uris, pool.map(fetch, uris), strict=True))
    rows = [finish(p, fetched[p.uri] if isinstance(p, Prepared) else None, cfg) for p in prepared]
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def process_chunk(chunk: dict[str, np.ndarray], cfg: PreprocessConfig) -> Iterator[pa.Table]:
    """A read task's whole chunk, ``ROW_GROUP_ROWS`` records at a time. Slicing here rather
    than through ``map_batches(batch_size=...)`` keeps read, process and write in one task:
    Ray Data does not fuse a read into a map that asks for a batch size."""
    for start in range(0, len(chunk["line"]), ROW_GROUP_ROWS):
        yield process_batch({k: v[start:start + ROW_GROUP_ROWS] for k, v in chunk.items()}, cfg)


def preprocess(cfg: PreprocessConfig, placement: Placement | None = None) -> dict[str, Any]:
    """Run the pipeline on the current Ray cluster's CPU pool; return the manifest."""
    for name in ("data", "image_root", "output", "tokenizer"):
        if not getattr(cfg, name):
            raise ValueError(f"preprocess: --{name.replace('_', '-')} is required")
    cfg = dataclasses.replace(cfg, **{k: storage.absolute(getattr(cfg, k))
                                      for k in ("data", "image_root", "output", "tokenizer")})
    check_inputs({"data": cfg.data, "image_root": cfg.image_root, "tokenizer": cfg.tokenizer}, outputs=(cfg.output,))
    init_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deterministic shards
    raw = open_records(cfg.data, cfg.output, cfg.shard_records)  # a streaming pass, no records held
    for part in PARTS:
        storage.delete_dir(storage.join(cfg.output, part))
    lines = chunk_lines(raw.records, int(ray.cluster_resources().get("CPU", 0)), cfg.shard_records)
    sink = ShardSink(cfg.output, records_in=raw.records, run_config=config.to_dict(cfg),
                     plain=cfg.template == "plain", group_rows=row_group_rows(lines),
                     val_fraction=cfg.val_fraction)
    # One task per chunk reads, processes and writes it: Ray Data fuses operators with equal
    # options and no batch size. As three operators (the memory on the map alone, a 64-row
    # batch size), Ray Data reserved CPUs per operator: on 2 CPUs the idle write held one,
    # so one map task ran at a time.
    opts = {**cpu_task_options(placement or Placement()), "memory": cfg.task_memory_mb * 2**20}
    ds = read_records(raw, opts.get("label_selector"), lines=lines, memory=opts["memory"])
    ds = ds.map_batches(process_chunk, fn_kwargs={"cfg": cfg}, batch_format="numpy", batch_size=None, **opts)
    ds.write_datasink(sink, ray_remote_args=opts)
    return sink.manifest
