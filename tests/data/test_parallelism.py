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
