"""Serving benchmark, one run, printed as a table (loopback traffic only, bounded).

1. Throughput and p50/p95 latency with 16 concurrent clients, dynamic batching
   (``max_batch_size=16``) vs no batching (``max_batch_size=1``). Target: >=2x throughput.
2. Serve overhead: one client, p50 latency over HTTP minus p50 of the same request run
   in-process on the engine directly. Target: <=25 ms.

3. Streaming: time to first token vs total latency, 16 streaming clients, 64-token answers.
   Target: TTFT p50 <=25% of total p50.
4. An authenticated request's p50 while 200 unauthenticated uploads are held half-sent.
   Target: <=1 s.
5. Replica RSS increase (HTTP front and model replica, sampled every 5 ms) for the worst
   uploads under the default limits: a 50-megapixel PNG and JPEG, a 20000x1 PNG (the pad
   canvas bomb), an 8-frame RLE DICOM of 4096x4096, a 10 MB text prompt. Target: <=300 MB.
6. ``--vllm-model DIR`` (run from ``.venv-vllm``, instead of 1-5): one exported model, the same
   requests (a real chest X-ray PNG, 1024 px wide, greedy) from the same 16 clients, side by
   side: vLLM's own OpenAI server, our front + vLLM (``backend: vllm``), our front + our
   engine. Target: our front + vLLM >= 0.8x vLLM's own server's throughput.

Usage: python benchmarks/serve.py [--requests 128] [--max-tokens 16]
       .venv-vllm/bin/python benchmarks/serve.py --vllm-model runs/demo/model
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests
from PIL import Image

from medvl.data.demo import train_tokenizer
from medvl.model.build import build_tiny
from medvl.serving.api import ServeConfig
from medvl.serving.engine import Engine, Request, write_meta
from medvl.tokenizer import load as load_tokenizer
from medvl.train.export import save_hf

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


def body(max_tokens: int, png: bytes | None = None) -> dict:
    url = "data:image/png;base64," + base64.b64encode(png or png_bytes()).decode()
    return {"model": "medvl", "max_tokens": max_tokens, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}]}


def load(url: str, n: int, clients: int, max_tokens: int, headers: dict | None = None,
         png: bytes | None = None) -> dict:
    """n requests from `clients` threads; returns throughput and latency percentiles."""
    payload = body(max_tokens, png)

    def one(_):
        t0 = time.perf_counter()
        r = requests.post(f"{url}/v1/chat/completions", json=payload, timeout=300, headers=headers)
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    lat = sorted(x for x, _ in results)
    return {"rps": n / wall, "tok_s": sum(t for _, t in results) / wall,
            "p50_ms": 1000 * lat[len(lat) // 2], "p95_ms": 1000 * lat[int(0.95 * (len(lat) - 1))]}


def streaming(url: str, clients: int, max_tokens: int) -> dict:
    """Each client streams one answer; time to the first content chunk and to [DONE]."""
    payload = {**body(max_tokens), "stream": True}

    def one(_):
        t0, first = time.perf_counter(), None
        with requests.post(f"{url}/v1/chat/completions", json=payload, timeout=300, stream=True) as r:
            for line in r.iter_lines():
                if first is None and line.startswith(b"data: {") and b'"content": "' in line \
                        and b'"content": ""' not in line:
                    first = time.perf_counter() - t0
        return first if first is not None else time.perf_counter() - t0, time.perf_counter() - t0

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients)))
    return {"ttft_ms": 1000 * statistics.median(r[0] for r in results),
            "total_ms": 1000 * statistics.median(r[1] for r in results)}


def under_flood(url: str, port: int, half_open: int, n: int, max_tokens: int) -> float:
    """p50 of authenticated requests, one at a time, while ``half_open`` uploads
    without a key hold their connections, bodies never finished."""
    socks = []
    for _ in range(half_open):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 150000\r\n\r\n{\"model\": ")
        socks.append(s)
    try:
        return load(url, n, 1, max_tokens, headers={"Authorization": "Bearer sk-bench"})["p50_ms"]
    finally:
        for s in socks:
            s.close()


def worst_uploads() -> dict[str, tuple[str, str]]:
    """name -> (MIME type, base64 payload) of uploads at or past the default limits."""
    import pydicom
    from pydicom.uid import RLELossless

    from medvl.data.demo import find_dicom_files

    def encoded(img: Image.Image, fmt: str) -> str:
        buf = io.BytesIO()
        img.save(buf, fmt)
        return base64.b64encode(buf.getvalue()).decode()

    side = 7071  # 50.0 megapixels, the default max_image_pixels
    big = Image.linear_gradient("L").resize((side, side)).convert("RGB")  # compresses to < 10 MB
    ds = pydicom.dcmread(find_dicom_files()["MR_small.dcm"])
    frame = np.kron(ds.pixel_array, np.ones((64, 64), ds.pixel_array.dtype))  # 4096 x 4096
    ds.NumberOfFrames, ds.Rows, ds.Columns = 8, *frame.shape
    ds.compress(RLELossless, np.stack([frame] * 8))
    dcm = io.BytesIO()
    ds.save_as(dcm)
    return {"PNG 7071x7071 (50 MP)": ("image/png", encoded(big, "PNG")),
            "JPEG 7071x7071 (50 MP)": ("image/jpeg", encoded(big, "JPEG")),
            "PNG 20000x1": ("image/png", encoded(Image.new("RGB", (20000, 1)), "PNG")),
            "DICOM 8 x 4096x4096 RLE": ("application/dicom", base64.b64encode(dcm.getvalue()).decode()),
            "10 MB text prompt": ("", "")}


def replica_pids() -> list[int]:
    """Our Serve replicas (front and model), found by the process titles Ray gives them."""
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any("MedVLChat" in c or "MedVLModel" in c for c in p.info["cmdline"] or [])]


def upload_rss(url: str) -> dict[str, tuple[int, float]]:
    """name -> (HTTP status, largest RSS increase in MB over any replica) per worst upload."""
    import threading

    import psutil

    procs = [psutil.Process(pid) for pid in replica_pids()]
    out = {}
    for name, (mime, payload) in worst_uploads().items():
        base = [p.memory_info().rss for p in procs]
        peak, stop = list(base), threading.Event()

        def sample(peak=peak, stop=stop):
            while not stop.is_set():
                for i, p in enumerate(procs):
                    peak[i] = max(peak[i], p.memory_info().rss)
                time.sleep(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        content = ([{"type": "image_url", "image_url": {"url": f"data:{mime};base64,{payload}"}},
                    {"type": "text", "text": QUESTION}] if mime else "问" * 3_000_000)  # 9 MB of UTF-8
        r = requests.post(f"{url}/v1/chat/completions", timeout=300, json={
            "model": "medvl", "max_tokens": 4, "messages": [{"role": "user", "content": content}]})
        stop.set()
        sampler.join()
        out[name] = (r.status_code, max(b - a for a, b in zip(base, peak, strict=True)) / 2**20)
    return out


def direct_p50(model: str, n: int, max_tokens: int) -> float:
    """The same request in-process: encode + generate on the engine, no HTTP, no Serve.
    With one intra-op thread, as the replica has (Ray sets OMP_NUM_THREADS to its num_cpus=1):
    the difference is then Serve's alone, not a thread count."""
    import torch

    torch.set_num_threads(1)
    engine = Engine(model)
    req = Request(turns=[(f"<image>\n{QUESTION}", None)], image=png_bytes(), max_tokens=max_tokens)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        for _step in engine.generate_batch([engine.prepare(req)]):
            pass
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def xray_png(path: str, width: int = 1024) -> bytes:
    """A real image of the size users send: by default the demo's chest X-ray (pydicom-data's
    RG1_UNCI.dcm, 1955 x 1841), windowed by our DICOM reader; scaled to ``width`` px."""
    from medvl.data.dicom import dicom_to_rgb

    with open(path, "rb") as f:
        data = f.read()
    img = Image.fromarray(dicom_to_rgb(data, 10**8)) if path.endswith(".dcm") else Image.open(io.BytesIO(data))
    buf = io.BytesIO()
    img.resize((width, round(img.height * width / img.width)), Image.Resampling.BICUBIC).save(buf, "PNG")
    return buf.getvalue()


def vllm_server(model: str, port: int, max_len: int):
    """vLLM's own OpenAI server on 127.0.0.1 (as `vllm serve` starts it), once it answers."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                             "--served-model-name", "medvl", "--host", "127.0.0.1", "--port", str(port),
                             "--dtype", "float32", "--max-model-len", str(max_len),
                             "--limit-mm-per-prompt", '{"image": 1}'],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).ok:
                return proc
        except requests.RequestException:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError(f"vLLM's server did not come up on port {port} (exit {proc.poll()})")


PROMPT_TOKENS = 512  # section 6: with max_tokens, vLLM's max_model_len (the demo model has 1024 positions)


def side_by_side(model: str, image: str, n: int, clients: int, max_tokens: int) -> dict[str, dict]:
    """Section 6: the same load on the three servers, one after another on the same port."""
    import ray
    from ray import serve

    from medvl.serving.app import run_local

    png, port, rows = xray_png(image), free_port(), {}
    url = f"http://127.0.0.1:{port}"
    proc = vllm_server(model, port, PROMPT_TOKENS + max_tokens)
    try:
        load(url, n, clients, max_tokens, png=png)  # warm-up, as long as the run
        rows["vLLM's own OpenAI server"] = load(url, n, clients, max_tokens, png=png)
    finally:
        proc.terminate()
        proc.wait(60)
    ray.init(include_dashboard=False, log_to_driver=False)
    for name, backend in (("our front + vLLM", "vllm"), ("our front + our engine", "medvl")):
        cfg = ServeConfig(model=model, backend=backend, max_prompt_tokens=PROMPT_TOKENS, max_tokens_cap=max_tokens,
                          max_batch_size=clients, batch_wait_timeout_s=0.01)
        run_local(cfg, port=port, blocking=False)
        load(url, n, clients, max_tokens, png=png)
        rows[name] = load(url, n, clients, max_tokens, png=png)
        serve.delete("medvl")
    serve.shutdown()
    ray.shutdown()
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def print_side_by_side(rows: dict[str, dict], n: int, clients: int, max_tokens: int) -> None:
    print(f"\n{n} requests (a chest X-ray as a PNG 1024 px wide, greedy), {clients} concurrent clients, "
          f"{max_tokens} tokens each, one exported model")
    print(f"{'server':<28}{'req/s':>8}{'tok/s':>9}{'p50 ms':>9}{'p95 ms':>9}")
    for name, r in rows.items():
        print(f"{name:<28}{r['rps']:>8.1f}{r['tok_s']:>9.0f}{r['p50_ms']:>9.1f}{r['p95_ms']:>9.1f}")
    ratio = rows["our front + vLLM"]["rps"] / rows["vLLM's own OpenAI server"]["rps"]
    print(f"our front + vLLM / vLLM's own server: {ratio:.2f}x (target >=0.8x)  {'MET' if ratio >= 0.8 else 'MISSED'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--vllm-model", help="section 6 only: this exported model on the three servers")
    ap.add_argument("--image", default="runs/demo/demo-data/images/RG1_UNCI.dcm", help="section 6's image")
    args = ap.parse_args()
    if args.vllm_model:
        rows = side_by_side(args.vllm_model, args.image, args.requests, args.clients, args.max_tokens)
        print_side_by_side(rows, args.requests, args.clients, args.max_tokens)
        return

    import ray
    from ray import serve

    from medvl.serving.app import run_local

    model = make_model(tempfile.mkdtemp(prefix="medvl-bench-"))
    ray.init(include_dashboard=False, log_to_driver=False)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    rows = {}
    for batch in (16, 1):
        cfg = ServeConfig(model=model, max_batch_size=batch, batch_wait_timeout_s=0.01)
        run_local(cfg, port=port, blocking=False)
        # Warm-up as long as the run: a fresh replica's first batch shapes (sizes 1..16 x
        # growing lengths) are slow once each, and a short warm-up left them in the measurement.
        load(url, args.requests, args.clients, args.max_tokens)
        rows[batch] = load(url, args.requests, args.clients, args.max_tokens)
    one_client = load(url, 30, 1, args.max_tokens)
    run_local(ServeConfig(model=model, max_batch_size=16, batch_wait_timeout_s=0.01), port=port, blocking=False)
    streaming(url, 16, 64)  # warm-up
    stream = streaming(url, 16, 64)
    keys = os.path.join(os.path.dirname(model), "keys.txt")
    with open(keys, "w") as f:
        f.write("sk-bench\n")
    run_local(ServeConfig(model=model, api_key_file=keys, body_timeout_s=60), port=port, blocking=False)
    flood = under_flood(url, port, 200, 20, args.max_tokens)
    run_local(ServeConfig(model=model), port=port, blocking=False)  # the default limits
    load(url, 4, 1, args.max_tokens)  # warm both replicas before their idle RSS is taken
    uploads = upload_rss(url)
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
    share = stream["ttft_ms"] / stream["total_ms"]
    print(f"\n16 streaming clients, 64 tokens: TTFT p50 {stream['ttft_ms']:.0f} ms, total p50 "
          f"{stream['total_ms']:.0f} ms, TTFT/total {share:.2f} (target <=0.25)  {'MET' if share <= 0.25 else 'MISSED'}")
    print(f"authenticated p50 with 200 half-sent unauthenticated uploads held: {flood:.0f} ms "
          f"(target <=1000 ms)  {'MET' if flood <= 1000 else 'MISSED'}")
    print(f"\n{'worst upload under the default limits':<36}{'HTTP':>6}{'replica RSS +MB':>17}")
    for name, (status, mb) in uploads.items():
        print(f"{name:<36}{status:>6}{mb:>17.0f}")
    worst = max(mb for _, mb in uploads.values())
    print(f"largest replica RSS increase: {worst:.0f} MB (target <=300 MB)  {'MET' if worst <= 300 else 'MISSED'}")


if __name__ == "__main__":
    main()
