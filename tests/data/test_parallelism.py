"""Preprocessing keeps every CPU busy, read from Ray's task table (not from a clock).

Issue 34: the map tasks ran one at a time (Ray Data reserved a CPU for the separate, idle
write operator) and a corpus smaller than one 1024-line chunk was one task on any cluster.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from benchmarks.preprocess import map_task_spans, peak_running
from medvl.data.preprocess import PreprocessConfig

DRIVER = """
import json, sys, ray
from medvl.data.preprocess import PreprocessConfig, preprocess

ray.init(address=sys.argv[2], log_to_driver=False)
m = preprocess(PreprocessConfig(**json.loads(sys.argv[1])))
print(json.dumps({"kept": m["records_kept"], "cpus": ray.cluster_resources()["CPU"]}))
"""


@pytest.mark.slow
def test_a_corpus_of_two_records_per_cpu_runs_a_map_task_on_every_cpu(ray_head, demo_dir, tmp_path):
    """2 x CPUs records on the 4-CPU ``ray_head`` cluster: 4 map tasks, all running at once.
    Each record decodes a 2500 px PNG, so a task outlasts its neighbours' start-up."""
    (tmp_path / "images").mkdir()
    noise = np.random.default_rng(0).integers(0, 255, (2500, 2500, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "images" / "big.png", compress_level=1)
    rec = {"image": "big.png", "conversations": [{"from": "human", "value": "<image>\n这是什么检查？"},
                                                 {"from": "gpt", "value": "这是一张CT图像。"}]}
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({**rec, "id": str(i)}, ensure_ascii=False) + "\n"
                                                 for i in range(8)))
    cfg = PreprocessConfig(data=str(tmp_path / "data.jsonl"), image_root=str(tmp_path / "images"),
                           output=str(tmp_path / "out"), tokenizer=str(demo_dir / "tokenizer"), image_size=32,
                           num_image_tokens=16, max_length=128, task_memory_mb=200)  # CPUs, not memory, bound it
    out = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cfg.__dict__), ray_head.gcs], env=ray_head.env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"kept": 8, "cpus": 4}
    spans = map_task_spans(ray_head.dashboard)
    assert len(spans) == 4 and peak_running(spans) == 4, spans


def test_peak_running_counts_overlaps_only():
    assert peak_running([(0, 1), (1, 2), (2, 3)]) == 1  # back to back: one CPU
    assert peak_running([(0, 3), (1, 2), (1.5, 4), (3.5, 5)]) == 3
    assert peak_running([]) == 0


@pytest.mark.parametrize("n", [0, 1, 37, 1000])
def test_chunks_cover_every_line_once_and_the_index_stays_bounded(tmp_path, monkeypatch, n):
    """Past MAX_MARKS offsets the index halves them: chunks of any size still cover every
    non-blank line exactly once, with its own line number, in at most ``max_chunk_lines``."""
    from medvl.data import sources

    monkeypatch.setattr(sources, "MAX_MARKS", 16)
    lines = ["" if i % 9 == 4 else json.dumps({"id": i, "t": "影像" * (i % 5)}, ensure_ascii=False) for i in range(n)]
    (tmp_path / "r.jsonl").write_text("\n".join(lines))  # no final newline
    raw = sources.open_records(str(tmp_path / "r.jsonl"), str(tmp_path), 100)
    assert len(raw.marks) <= 16 and raw.records == sum(1 for t in lines if t)
    expected = [(i + 1, t) for i, t in enumerate(lines) if t]
    for size in (1, 3, 64, 10_000):
        chunks = raw.chunks(size)
        got = [(int(n_), str(t)) for c in chunks for table in sources.read_chunk(raw.uri, c)
               for n_, t in zip(table["line"].to_pylist(), table["text"].to_pylist(), strict=True)]
        assert got == expected
        data = (tmp_path / "r.jsonl").read_bytes()
        spans = [len(data[c.offset:c.offset + c.size].splitlines()) for c in chunks]
        assert min(spans, default=1) > 0 and max(spans, default=0) <= max(min(size, 100), raw.step)


def test_chunk_lines_gives_every_cpu_work():
    from medvl.data.sources import chunk_lines

    assert chunk_lines(8, 4, 1024) == 2  # 2 x CPUs records: one chunk per CPU
    assert chunk_lines(2000, 2, 1024) == 250  # 4 chunks per CPU
    assert chunk_lines(2000, 16, 1024) == 64  # never below 64 lines when every CPU still gets one
    assert chunk_lines(580_014, 16, 1024) == 1024  # at most shard_records
