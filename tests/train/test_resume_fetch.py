"""A resume fetches, per rank, its own ZeRO partitions and the common state, not the whole
checkpoint (``as_directory()`` downloaded all of it to every rank: at 13B, ~156 GB per node
for 1/8 of it used)."""

from __future__ import annotations

import json
import posixpath
import re

import pyarrow.fs as pafs
import pytest

from medvl import storage
from medvl.train.config import TrainConfig
from medvl.train.trainer import train


def _sizes(uri: str) -> dict[str, int]:
    fs, path = storage.resolve(uri)
    return {posixpath.relpath(i.path, path): i.size
            for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.type == pafs.FileType.File}


@pytest.mark.slow
def test_a_zero3_resume_fetches_only_the_files_of_its_rank(demo_shards, demo_dir, s3_endpoint):
    out = f"{s3_endpoint}/runs/z3fetch"
    cfg = TrainConfig(stage=2, data=str(demo_shards / "in"), output=out, name="z3fetch",
                      tokenizer=str(demo_dir / "tokenizer"), batch_size=4, zero_stage=3, max_steps=2, log_every=100)
    train(cfg)
    train(cfg)  # same output + name: Ray Train restores the step-2 checkpoint on both ranks
    files = _sizes(storage.join(out, "z3fetch", "checkpoint_000002"))
    rank_of = {f: re.search(r"zero_pp_rank_(\d+)_", f) for f in files}
    common = sum(n for f, n in files.items() if not rank_of[f])
    for rank in range(2):
        share = sum(n for f, n in files.items() if rank_of[f] and int(rank_of[f].group(1)) == rank)
        feed = json.loads(storage.read_text(storage.join(out, "feed", f"rank{rank}.json")))
        assert feed["start_step"] == 2  # resumed, not trained again
        fetched = feed["resume_bytes"]
        assert share > 0 and share <= fetched <= 1.2 * share + common, (rank, fetched, share, common, files)
        assert fetched < 0.75 * sum(files.values())  # two ranks: about half, not all
