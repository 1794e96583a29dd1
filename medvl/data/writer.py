"""A Ray Data sink that splits processed rows into Parquet shards and rejects, in one pass.

Filtering one dataset twice (kept / rejected) would decode every image twice; writing
both from the same task keeps the pipeline single-pass and still loses nothing.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.datasource.datasink import WriteResult

from medvl import storage
from medvl.data import holdout

# One processed record, kept (reason empty) or rejected.
ROW_SCHEMA = pa.schema([
    ("id", pa.string()), ("line", pa.int64()), ("reason", pa.string()), ("detail", pa.string()),
    ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
    ("pixels", pa.binary()), ("length", pa.int32()),
    ("question_tokens", pa.list_(pa.int32())), ("answer_tokens", pa.list_(pa.int32())),
    ("holdout_key", pa.string()),  # what decides train or val (``holdout.holdout_key``); not stored
])
SHARD_COLUMNS = ["id", "input_ids", "labels", "pixels", "length"]
SHARD_SCHEMA = pa.schema([ROW_SCHEMA.field(c) for c in SHARD_COLUMNS])
# The feed reads whole row groups: small ones keep a rank's reads close to its own rows
# and a preprocess task's memory to one row group.
ROW_GROUP_ROWS = 64
# Row groups per shard at least, where a shard is too small for 64-row groups: a rank's range
# ends inside at most two groups, so it reads at most 2/8 of a shard it only touches.
MIN_GROUPS_PER_SHARD = 8


def row_group_rows(shard_rows: int) -> int:
    """Rows per Parquet row group in a shard of ``shard_rows``: ``ROW_GROUP_ROWS``, smaller for
    small shards. Small corpora are cut into one small shard per CPU (issue 34); with whole
    64-row groups, a 43-row shard was one group, and a rank needing one row of it read it all."""
    return max(1, min(ROW_GROUP_ROWS, shard_rows // MIN_GROUPS_PER_SHARD))
# Pixels stay raw uint8 (exactly LLaVA's, no decode in the feed), zstd-compressed: 97 KB
# per 336-px image against 116 KB snappy, 55 KB PNG (decodes at 380/s per core: slower than
# a feed must be) and 22 KB JPEG-95 (lossy); zstd also reads 3x faster than snappy here.
# No dictionaries: distinct 338 KB images gain nothing and a page of them costs memory.
# No statistics on pixels: nothing filters on them, and below Arrow's 4 KB cap (images up to
# 36 px) their min and max went into the footer, which the feed reads for every shard it
# touches: 54 KB of a 60 KB footer for nine 6-row groups of 32-px images.
SHARD_ENCODING = {"compression": "zstd", "use_dictionary": False,
                  "write_statistics": [c for c in SHARD_COLUMNS if c != "pixels"]}
PARTS = ("shards", "val")  # training rows, held-out rows (``holdout.py``): one directory each


class ShardSink(Datasink):
    def __init__(self, output: str, records_in: int, run_config: dict, plain: bool, group_rows: int = ROW_GROUP_ROWS,
                 val_fraction: float = 0.0):
        self.output = output
        self.group_rows = group_rows  # rows per Parquet row group (``row_group_rows``)
        self.val_fraction = val_fraction
        self.records_in = records_in
        self.run_config = run_config
        self.plain = plain  # stage-1 answers are captions: report them as such
        self.manifest: dict[str, Any] = {}

    def write(self, blocks, ctx) -> dict[str, Any]:
        """Stream this task's blocks into one shard of small row groups per part (training,
        held out), keeping only the rejects and the token counts in memory."""
        shard = f"part-{ctx.task_idx:05d}.parquet"
        out: dict[str, Any] = {"kept": 0, "truncated": 0, "rejects": [], "question_tokens": [],
                               "answer_tokens": [], "lengths": [], **{p: 0 for p in PARTS}}
        writers: dict[str, pq.ParquetWriter] = {}
        try:
            for block in blocks:
                table = block if isinstance(block, pa.Table) else pa.table(block)
                rejected = pc.not_equal(table["reason"], "")
                kept = table.filter(pc.invert(rejected))
                out["rejects"] += table.filter(rejected).select(["line", "id", "reason", "detail"]).to_pylist()
                if not kept.num_rows:
                    continue
                for part, rows in zip(PARTS, holdout.split(kept, self.val_fraction), strict=True):
                    if not rows.num_rows:
                        continue
                    if part not in writers:
                        writers[part] = self._open(f"{part}/{shard}")
                    writers[part].write_table(rows.select(SHARD_COLUMNS).cast(SHARD_SCHEMA),
                                              row_group_size=self.group_rows)
                    out[part] += rows.num_rows
                out["kept"] += kept.num_rows
                out["truncated"] += pc.sum(pc.not_equal(kept["detail"], "")).as_py() or 0  # kept, cut
                out["question_tokens"] += pc.list_flatten(kept["question_tokens"]).to_pylist()
                out["answer_tokens"] += pc.list_flatten(kept["answer_tokens"]).to_pylist()
                out["lengths"] += kept["length"].to_pylist()
        finally:
            for writer in writers.values():
                writer.close()
        out["shard"] = shard
        return out

    def _open(self, rel: str) -> pq.ParquetWriter:
        fs, path = storage.resolve(storage.join(self.output, rel))
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        return pq.ParquetWriter(path, SHARD_SCHEMA, filesystem=fs, **SHARD_ENCODING)

    def on_write_complete(self, write_result: WriteResult) -> None:
        results = write_result.write_returns
        rejects = sorted((r for res in results for r in res["rejects"]), key=lambda r: r["line"])
        lines = [json.dumps({k: r[k] for k in ("id", "line", "reason", "detail")}, ensure_ascii=False)
                 for r in rejects]
        storage.write_text(storage.join(self.output, "rejects.jsonl"), "".join(x + "\n" for x in lines))
        kept = sum(res["kept"] for res in results)
        results = sorted(results, key=lambda res: res["shard"])
        answers = [n for res in results for n in res["answer_tokens"]]
        tokens = {"sample_length": _quartiles([n for res in results for n in res["lengths"]])}
        if self.plain:
            tokens["caption"] = _quartiles(answers)
        else:
            tokens["question"] = _quartiles([n for res in results for n in res["question_tokens"]])
            tokens["answer"] = _quartiles(answers)
        self.manifest = {
            "records_in": self.records_in,
            "records_kept": kept,
            "records_rejected": len(rejects),
            "records_truncated": sum(res["truncated"] for res in results),
            "rejects_by_reason": dict(sorted(Counter(r["reason"] for r in rejects).items())),
            "shards": [f"shards/{res['shard']}" for res in results if res["shards"]],
            "shard_rows": [res["shards"] for res in results if res["shards"]],
            "val_fraction": self.val_fraction,  # held out by a hash of the image (holdout.py)
            "records_val": sum(res["val"] for res in results),
            "val_shards": [f"val/{res['shard']}" for res in results if res["val"]],
            "val_shard_rows": [res["val"] for res in results if res["val"]],
            "tokens": tokens,
            "config": self.run_config,
        }
        if kept + len(rejects) != self.records_in:
            raise RuntimeError(f"accounting broke: {kept} kept + {len(rejects)} rejected "
                               f"!= {self.records_in} records in")
        storage.write_text(storage.join(self.output, "manifest.json"),
                           json.dumps(self.manifest, ensure_ascii=False, indent=2))


def _quartiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    q1, med, q3 = np.percentile(np.asarray(values), [25, 50, 75])
    return {"count": len(values), "median": float(med), "q1": float(q1), "q3": float(q3),
            "max": int(max(values))}
