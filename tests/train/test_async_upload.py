"""Checkpoint uploads do not stall training: the next steps run while the shards upload
(at 13B a stage-2 checkpoint is ~156 GB; uploaded inside ``report``, every GPU waited for
the whole transfer), and the last checkpoint is complete and resumable once ``fit`` returns.

Storage is slow on purpose: Ray's uploads go through a loopback TCP relay to the moto S3
server that holds each HTTP request back ``DELAY`` seconds, and records when it arrived.
"""

from __future__ import annotations

import glob
import json
import os
import posixpath
import socket
import tempfile
import threading
import time
from urllib.parse import urlparse

import pyarrow.fs as pafs
import pytest

from medvl import storage
from medvl.train.checkpoint import upload_prefix
from medvl.train.config import TrainConfig
from medvl.train.trainer import train
from tests.conftest import free_port

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]

DELAY = 0.5  # seconds each request to the storage waits in the relay
METHODS = (b"GET ", b"PUT ", b"POST ", b"HEAD ", b"DELETE ")


class SlowRelay(threading.Thread):
    """127.0.0.1:port -> the S3 server; each HTTP request is held ``DELAY`` s and its
    request line recorded with the time it arrived."""

    def __init__(self, target: str):
        super().__init__(daemon=True)
        self.target = (urlparse(target).hostname, urlparse(target).port)
        self.port = free_port()
        self.server = socket.create_server(("127.0.0.1", self.port))
        self.requests: list[tuple[float, str]] = []
        self.start()

    def run(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, requests: bool) -> None:
        try:
            while chunk := src.recv(1 << 16):
                if requests and chunk.startswith(METHODS):
                    self.requests.append((time.time(), chunk.split(b"\r\n", 1)[0].decode("latin-1")))
                    time.sleep(DELAY)
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                s.close()

    def close(self) -> None:
        self.server.close()


def _files(uri: str) -> list[str]:
    fs, path = storage.resolve(uri)
    return [posixpath.relpath(i.path, path) for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
            if i.type == pafs.FileType.File]


def test_training_runs_on_while_a_checkpoint_uploads(demo_shards, demo_dir, s3_endpoint, monkeypatch):
    out = f"{s3_endpoint}/runs/asyncup"
    cfg = TrainConfig(stage=2, data=str(demo_shards / "in"), output=out, name="asyncup",
                      tokenizer=str(demo_dir / "tokenizer"), batch_size=4, zero_stage=3, max_steps=4,
                      checkpoint_every=2, log_every=100)
    direct = os.environ["AWS_ENDPOINT_URL"]
    relay = SlowRelay(direct)
    # The driver builds the storage filesystem Ray Train uploads with: through the relay.
    # The workers' own reads and writes (metrics, export) go to the server directly.
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{relay.port}")
    try:
        s = train(cfg)
    finally:
        monkeypatch.setenv("AWS_ENDPOINT_URL", direct)
    assert s["steps"] == 4
    metrics = [json.loads(x) for x in storage.read_text(storage.join(out, "metrics.jsonl")).splitlines()]
    step3 = next(m for m in metrics if m["step"] == 3)
    step3_began = step3["time"] - step3["step_s"]  # rank 0's clock, as its upload's
    # Rank 0's files of checkpoint 2 (its ZeRO partitions and the state): the last request arrived
    # after step 3 began. A synchronous upload returns from report after all of them.
    rank0 = [t for t, line in relay.requests
             if "checkpoint_000002/" in line and ("_rank_0_" in line or "state.json" in line)]
    assert len(rank0) >= 3, relay.requests
    assert step3_began < max(rank0), (step3_began, max(rank0) - step3_began)

    # When fit() returned, the last checkpoint was whole (flushed), and the local copies are gone.
    relay.close()
    files = _files(storage.join(out, "asyncup", "checkpoint_000004"))
    assert "state.json" in files and all(any(f"_rank_{r}_" in f for f in files) for r in range(2)), files
    leftovers = [p for r in range(2) for p in glob.glob(os.path.join(tempfile.gettempdir(), upload_prefix(cfg, r) + "*"))]
    assert not leftovers, leftovers
    train(cfg)  # same output + name: both ranks restore checkpoint 4
    for rank in range(2):
        feed = json.loads(storage.read_text(storage.join(out, "feed", f"rank{rank}.json")))
        assert feed["start_step"] == 4
