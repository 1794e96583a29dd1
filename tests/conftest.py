"""Shared fixtures: a real loopback S3 server (moto), one local Ray cluster, demo data."""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

# Local clusters in tests run without Ray's token auth (it breaks `ray job submit`).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def png_header(w: int, h: int) -> bytes:
    """A PNG whose header claims ``w x h`` (its pixel data is never reached): a memory-bomb probe."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")


def _reserved_ports():
    """Ports below the kernel's ephemeral range and above Ray's worker ports (10002-19999),
    from a per-process offset: no ``bind(0)`` and no Ray worker can take one between our pick
    and its use, which for the pipeline's Serve port is minutes later; each is handed out once."""
    lo = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    start = 20000 + (os.getpid() * 97) % (lo - 20000)
    for i in range(lo - 20000):
        yield 20000 + (start - 20000 + i) % (lo - 20000)


_PORTS = _reserved_ports()


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """A test server's request handler that logs nothing to the test's stderr."""

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def http_server(port: int, handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[None]:
    """``handler`` serving 127.0.0.1:``port`` from a daemon thread while the block runs."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield
    finally:
        server.shutdown()


def free_port() -> int:
    """A port free now that nothing else will be given before the caller binds it."""
    for port in _PORTS:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto in server mode on 127.0.0.1, with the standard AWS variables pointing at it.

    Set before Ray starts, so Ray workers inherit the same endpoint and credentials.
    """
    port = free_port()
    # AWS managed policies (AmazonEC2FullAccess, which cluster/iam.py attaches) exist in IAM
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "MOTO_IAM_LOAD_MANAGED_POLICIES": "true"})
    url = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    import boto3

    boto3.client("s3").create_bucket(Bucket="medvl-test")
    yield "s3://medvl-test"
    proc.terminate()
    proc.wait(timeout=10)


@dataclass(frozen=True)
class Head:
    dashboard: str  # http://127.0.0.1:PORT, for `ray job submit --address`
    gcs: str  # 127.0.0.1:PORT, for RAY_ADDRESS
    env: dict[str, str]


@pytest.fixture(scope="module")
def ray_head():
    """A separate local Ray cluster, as `ray start --head` makes it; removed afterwards."""
    temp = tempfile.mkdtemp(prefix="rh")  # short: Ray's socket paths must stay under 107 bytes
    dash, gcs = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    # Every port explicit: the test session's own Ray already holds the default agent ports.
    ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port")]
    ray = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray, "start", "--head", "--num-cpus=4", f"--port={gcs}", *ports, "--include-dashboard=true",
                    f"--dashboard-port={dash}", f"--temp-dir={temp}", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True, timeout=120)
    yield Head(f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}", env)
    stop_cluster(temp)


def stop_cluster(temp: str) -> None:
    """Kill a cluster this test session started with ``ray start --temp-dir=temp``: every
    process of it (and only of it) names its temp dir; never ``ray stop``."""
    procs = [p for p in psutil.process_iter(["cmdline"]) if any(temp in c for c in (p.info["cmdline"] or []))]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    from medvl.data.demo import build_demo_data

    out = tmp_path_factory.mktemp("demo")
    build_demo_data(str(out), variants=2)
    return out


@pytest.fixture(scope="session")
def bpe_tokenizer(demo_dir):
    """The demo's byte-level BPE (GPT/Qwen style)."""
    from medvl.tokenizer import load

    return load(str(demo_dir / "tokenizer"))


@pytest.fixture(scope="session")
def spm_tokenizer(spm_tokenizer_dir):
    from transformers import PreTrainedTokenizerFast

    from medvl.tokenizer import prepare

    return prepare(PreTrainedTokenizerFast.from_pretrained(spm_tokenizer_dir))


@pytest.fixture(scope="session")
def spm_tokenizer_dir(tmp_path_factory, demo_dir):
    """A sentencepiece-style (Metaspace, Llama-like) tokenizer trained on Chinese text."""
    import json

    from tokenizers import SentencePieceBPETokenizer, normalizers
    from transformers import PreTrainedTokenizerFast

    texts = [c["value"] for f in demo_dir.glob("*.jsonl") for line in f.read_text().splitlines()
             for c in json.loads(line)["conversations"]]
    texts += CHINESE_QA_TEXT
    sp = SentencePieceBPETokenizer()
    sp.normalizer = normalizers.Sequence([])  # like Llama: keep full-width punctuation
    sp.train_from_iterator(texts + ["USER: ASSISTANT: A chat between"], vocab_size=800,
                           special_tokens=["<unk>", "<s>", "</s>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", add_bos_token=True)  # adds <s>, as Llama-2
    out = tmp_path_factory.mktemp("spm")
    tok.save_pretrained(out)
    return out


CHINESE_QA_TEXT = [
    "患者胸部X线片显示右下肺野片状阴影，考虑肺炎。",
    "这张CT图像中可见肝脏低密度病灶吗？",
    "可见，肝右叶见一直径约2厘米的低密度结节，边界清楚。",
    "磁共振T2加权像显示肩袖撕裂。",
]


def stage1_cfg(shards, demo_dir, output: str, name: str, **kw):
    """The stage-1 recipe the training tests share (fault tests compare against its run)."""
    from medvl.train.config import TrainConfig

    base = dict(stage=1, data=str(shards / "al"), output=output, name=name, tokenizer=str(demo_dir / "tokenizer"),
                batch_size=4, lr=1e-2, epochs=3, checkpoint_every=10, zero_stage=2, log_every=100)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="session")
def demo_shards(ray_cluster, demo_dir, tmp_path_factory):
    """The demo corpus preprocessed: ``al`` (alignment, plain) and ``in`` (instruction, v1)."""
    from medvl.data.preprocess import PreprocessConfig, preprocess

    out = tmp_path_factory.mktemp("shards")
    common = dict(image_root=str(demo_dir / "images"), tokenizer=str(demo_dir / "tokenizer"),
                  image_size=32, num_image_tokens=16, max_length=256)
    preprocess(PreprocessConfig(data=str(demo_dir / "alignment_train.jsonl"), output=str(out / "al"),
                                template="plain", **common))
    preprocess(PreprocessConfig(data=str(demo_dir / "instruction_train.jsonl"), output=str(out / "in"),
                                template="v1", **common))
    return out


@pytest.fixture(scope="session")
def stage1(demo_shards, demo_dir, tmp_path_factory):
    """An uninterrupted stage-1 run (ZeRO-2) on the demo corpus."""
    from medvl.train.trainer import train

    return train(stage1_cfg(demo_shards, demo_dir, str(tmp_path_factory.mktemp("s1")), "stage1"))


@pytest.fixture(scope="session")
def stage2(stage1, demo_shards, tmp_path_factory):
    """Stage 2 (ZeRO-3) from stage 1's export: the trained demo model of the eval tests."""
    from medvl.train.trainer import train

    return train(stage2_cfg(demo_shards, stage1["hf"], str(tmp_path_factory.mktemp("s2")), "stage2"))


def stage2_cfg(shards, init: str, output: str, name: str, **kw):
    """The stage-2 recipe the tests share (the ZeRO-3 fault test compares against its run)."""
    from medvl.train.config import TrainConfig

    base = dict(stage=2, data=str(shards / "in"), output=output, name=name, init=init, batch_size=4, lr=2e-3,
                epochs=1, zero_stage=3, log_every=100, max_shard_mb=1)  # 1 MB shards: the export must shard
    return TrainConfig(**{**base, **kw})
