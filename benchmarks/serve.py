"""Serving benchmark, one run, printed as a table (loopback traffic only, bounded).

1. Throughput and p50/p95 latency with 16 concurrent clients, dynamic batching
   (``max_batch_size=16``) vs no batching (``max_batch_size=1``). Target: >=2x throughput.
2. Serve overhead: one client, p50 latency over HTTP minus p50 of the same request run
   in-process on the engine directly. Target: <=25 ms.

Usage: python benchmarks/serve.py [--requests 128] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import base64
import io
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests
from PIL import Image

from medvl.data.demo import train_tokenizer
from medvl.model.build import build_tiny, save_hf
from medvl.serving.api import ServeConfig
from medvl.serving.engine import Engine, Request, write_meta
from medvl.tokenizer import load as load_tokenizer

QUESTION = "这是什么检查？请描述所见。"


def make_model(root: str) -> str:
    train_tokenizer([QUESTION, "这是一张胸部X线图像，未见明显异常。"], f"{root}/tok", vocab_size=400)
    tok = load_tokenizer(f"{root}/tok")
    save_hf(build_tiny(tok), tok, f"{root}/model")
    write_meta(f"{root}/model", template="v1", aspect="pad", image_size=32)
    return f"{root}/model"


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 48, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def body(max_tokens: int) -> dict:
    url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    return {"model": "medvl", "max_tokens": max_tokens, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}]}


def load(url: str, n: int, clients: int, max_tokens: int) -> dict:
    """n requests from `clients` threads; returns throughput and latency percentiles."""
    payload = body(max_tokens)

    def one(_):
        t0 = time.perf_counter()
        r = requests.post(f"{url}/v1/chat/completions", json=payload, timeout=300)
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    lat = sorted(x for x, _ in results)
    return {"rps": n / wall, "tok_s": sum(t for _, t in results) / wall,
            "p50_ms": 1000 * lat[len(lat) // 2], "p95_ms": 1000 * lat[int(0.95 * (len(lat) - 1))]}


def direct_p50(model: str, n: int, max_tokens: int) -> float:
    """The same request in-process: encode + generate on the engine, no HTTP, no Serve."""
    engine = Engine(model)
    req = Request(turns=[(f"<image>\n{QUESTION}", None)], image=png_bytes(), max_tokens=max_tokens)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        for _step in engine.generate_batch([engine.prepare(req)]):
            pass
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()

    import ray
    from ray import serve

    from medvl.serving.app import run_local

    model = make_model(tempfile.mkdtemp(prefix="medvl-bench-"))
    ray.init(include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    rows = {}
    for batch in (16, 1):
        cfg = ServeConfig(model=model, max_batch_size=batch, batch_wait_timeout_s=0.01)
        run_local(cfg, port=port, blocking=False)
        load(url, args.clients, args.clients, args.max_tokens)  # warm-up
        rows[batch] = load(url, args.requests, args.clients, args.max_tokens)
    one_client = load(url, 30, 1, args.max_tokens)
    serve.shutdown()
    ray.shutdown()
    direct = direct_p50(model, 30, args.max_tokens)

    print(f"\n{args.requests} requests, {args.clients} concurrent clients, {args.max_tokens} tokens each")
    print(f"{'max_batch_size':<16}{'req/s':>8}{'tok/s':>9}{'p50 ms':>9}{'p95 ms':>9}")
    for b, r in rows.items():
        print(f"{b:<16}{r['rps']:>8.1f}{r['tok_s']:>9.0f}{r['p50_ms']:>9.1f}{r['p95_ms']:>9.1f}")
    speedup = rows[16]["rps"] / rows[1]["rps"]
    print(f"batching speed-up: {speedup:.2f}x (target >=2x)  {'MET' if speedup >= 2 else 'MISSED'}")
    overhead = one_client["p50_ms"] - direct
    print(f"\none client: HTTP p50 {one_client['p50_ms']:.1f} ms, in-process p50 {direct:.1f} ms, "
          f"Serve overhead {overhead:.1f} ms (target <=25 ms)  {'MET' if overhead <= 25 else 'MISSED'}")


if __name__ == "__main__":
    main()
