"""Requests that outlive their client or their replica, over real HTTP on 127.0.0.1.

A random tiny model with a long position range decodes ``N`` tokens, long enough that a
request is reliably still decoding while the test closes its stream or kills its replica.
"""

import json
import threading
import time

import pytest
import requests

from medvl.model.build import build_tiny
from medvl.serving.engine import write_meta
from medvl.train.export import save_hf
from tests.conftest import free_port
from tests.serving.conftest import png_data_uri, wait_healthy

pytestmark = pytest.mark.slow  # starts Serve: not in `make test-fast`

N = 3000  # tokens per request: seconds of decoding on 2 cores


@pytest.fixture(scope="module")
def long_server(ray_cluster, bpe_tokenizer, tmp_path_factory):
    from ray import serve

    from medvl.serving.api import ServeConfig
    from medvl.serving.app import run_local

    model = build_tiny(bpe_tokenizer, seed=0)
    model.config.text_config.max_position_embeddings = N + 512  # RoPE positions are computed, not learned
    uri = str(tmp_path_factory.mktemp("long"))
    save_hf(model, bpe_tokenizer, uri)
    write_meta(uri, template="v1", aspect="pad", image_size=32)
    port = free_port()
    run_local(ServeConfig(model=uri, max_tokens_cap=N), port=port, blocking=False,
              options={"ray_actor_options": {"num_cpus": 0.5}})
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    yield url
    serve.shutdown()


def _body(stream: bool) -> dict:
    return {"model": "medvl", "max_tokens": N, "stream": stream, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_uri()}}, {"type": "text", "text": "这是什么检查？"}]}]}


def _decoding(url: str) -> int:
    return requests.get(f"{url}/healthz", timeout=30).json()["decoding"]


def _wait_decoding(url: str, want, timeout: float) -> float:
    """Seconds until ``want(decoding)`` holds; fails after ``timeout``."""
    t0 = time.time()
    while not want(n := _decoding(url)):
        assert time.time() - t0 < timeout, f"still {n} decoding after {timeout:.0f} s"
        time.sleep(0.05)
    return time.time() - t0


def test_a_closed_stream_leaves_its_batch(long_server):
    t0 = time.time()
    full = requests.post(f"{long_server}/v1/chat/completions", json=_body(False), timeout=300).json()
    whole = time.time() - t0
    assert full["usage"]["completion_tokens"] == N, full  # the control: it decodes all N
    with requests.post(f"{long_server}/v1/chat/completions", json=_body(True), stream=True, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert _decoding(long_server) == 1
    gone = _wait_decoding(long_server, lambda n: n == 0, timeout=whole)
    assert gone < whole / 3, f"the abandoned request decoded for {gone:.1f} s of {whole:.1f} s"


def _kill_model_replica() -> None:
    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if "MedVLModel" in a["name"] and a["name"].startswith("SERVE_REPLICA")]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=True)


def test_a_crashed_replica_answers_its_requests_with_openai_503s(long_server):
    out: dict = {}

    def unary():
        r = requests.post(f"{long_server}/v1/chat/completions", json=_body(False), timeout=300)
        out["unary"] = (r.status_code, r.headers.get("content-type", ""), r.json())

    def stream():
        with requests.post(f"{long_server}/v1/chat/completions", json=_body(True), stream=True,
                           timeout=300) as r:
            out["stream"] = [line for line in r.iter_lines() if line]

    threads = [threading.Thread(target=unary), threading.Thread(target=stream)]
    for t in threads:
        t.start()
    _wait_decoding(long_server, lambda n: n == 2, timeout=60)
    _kill_model_replica()
    for t in threads:
        t.join(timeout=120)
    status, kind, body = out["unary"]
    assert status == 503 and kind.startswith("application/json"), out["unary"]
    assert body["error"]["code"] == "model_unavailable" and body["error"]["type"] == "server_error"
    events = out["stream"]
    assert events[-1] == b"data: [DONE]"
    assert json.loads(events[-2][len(b"data: "):])["error"]["code"] == "model_unavailable"
    wait_healthy(long_server)  # Serve replaces the replica; the endpoint answers again
    r = requests.post(f"{long_server}/v1/chat/completions", timeout=300,
                      json={**_body(False), "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
