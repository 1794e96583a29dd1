"""No anonymous endpoint by accident: exposure, keys, per-key slots, error bodies (issue #31, 2).

The Serve tests run the real front over real HTTP on 127.0.0.1, in front of a model exported
with one image token too many (a misexport): the real engine fails on every image request
with a real remote traceback, whose text must reach the server log and not the client.
"""

import glob
import json
import logging
import os
import socket
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import requests

from medvl.serving.api import ServeConfig
from tests.conftest import QuietHandler, free_port, http_server
from tests.serving.conftest import QUESTION, png_data_uri, serving

KEY_A, KEY_B = "sk-guard-a", "sk-guard-b"


# --- exposure ----------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "serve.example"])
def test_non_loopback_without_keys_refuses_to_start_in_one_line(host, monkeypatch):
    from medvl.serving.app import run_local

    monkeypatch.delenv("MEDVL_API_KEYS", raising=False)
    with pytest.raises(ValueError, match="without API keys") as e:
        run_local(ServeConfig(model="/nonexistent"), host=host, blocking=False)
    assert "\n" not in str(e.value) and "allow_anonymous" in str(e.value)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_loopback_needs_no_keys(host):
    from medvl.serving.guard import check_exposure

    check_exposure(ServeConfig(), host, [])


def test_keys_or_allow_anonymous_let_it_start_and_anonymity_is_logged(caplog):
    from medvl.serving.guard import check_exposure, logger

    check_exposure(ServeConfig(), "0.0.0.0", [b"sk-1"])
    logger.addHandler(caplog.handler)  # Ray's logger does not propagate to the root
    try:
        with caplog.at_level(logging.WARNING, logger=logger.name):
            check_exposure(ServeConfig(allow_anonymous=True), "0.0.0.0", [])
    finally:
        logger.removeHandler(caplog.handler)
    assert "WITHOUT API keys" in caplog.text


# --- keys ------------------------------------------------------------------------------
def _compare_digest_calls(fn) -> int:
    """How often ``fn`` calls ``hmac.compare_digest`` (a C function: seen by the profiler)."""
    import hmac

    calls = 0

    def profile(_frame, event, arg):
        nonlocal calls
        calls += event == "c_call" and arg is hmac.compare_digest

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def test_keys_are_compared_in_constant_time_and_all_of_them():
    from medvl.serving.guard import key_of

    keys = [b"sk-1", b"sk-2", b"sk-3"]
    for header, want in [("Bearer sk-1", b"sk-1"), ("Bearer sk-9", None), ("sk-1", None),
                         ("Bearer ключ", None),  # non-ASCII text: compare_digest takes bytes only
                         ("bearer sk-2", b"sk-2"), ("BEARER sk-3", b"sk-3"),  # RFC 7235: any case
                         ("Basic sk-1", None), ("Bearersk-1", None)]:
        assert _compare_digest_calls(lambda h=header: key_of(h, keys)) == len(keys)
        assert key_of(header, keys) == want


@pytest.mark.parametrize("header,host", [("127.0.0.1:8000", "127.0.0.1"), ("[::1]:8000", "::1"),
                                         ("LocalHost", "localhost"), ("evil.example", "evil.example"),
                                         ("[::1", ""), ("", "")])
def test_the_host_a_host_header_names(header, host):
    from medvl.serving.guard import host_name

    assert host_name(header) == host


# --- over HTTP ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gate():
    """An image host whose answers (404s) wait until the test opens the gate: a decode
    thread that runs as long as the test likes."""
    port = free_port()
    gate = SimpleNamespace(url=f"http://127.0.0.1:{port}/x.png", host=f"127.0.0.1:{port}",
                           arrived=threading.Semaphore(0), opened=threading.Event())

    class Handler(QuietHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            gate.arrived.release()
            gate.opened.wait(120)
            self.send_response(404)
            self.end_headers()

    with http_server(port, Handler):
        yield gate
        gate.opened.set()


@pytest.fixture(scope="module")
def guarded(ray_cluster, bpe_tokenizer, tmp_path_factory, gate):
    """Two keys, two requests in flight per key; the model misexported (see module doc)."""
    from medvl.model.build import build_tiny
    from medvl.serving.engine import write_meta
    from medvl.train.export import save_hf

    model = build_tiny(bpe_tokenizer, seed=0)
    model.config.image_seq_length += 1
    uri = str(tmp_path_factory.mktemp("misexported"))
    save_hf(model, bpe_tokenizer, uri)
    write_meta(uri, template="v1", aspect="pad", image_size=32)
    keyfile = tmp_path_factory.mktemp("keys") / "keys.txt"
    keyfile.write_text(f"{KEY_A}\n{KEY_B}\n")
    cfg = ServeConfig(model=uri, api_key_file=str(keyfile), max_requests_per_key=2, body_timeout_s=4,
                      max_tokens_cap=4, allowed_image_hosts=[gate.host], allow_private_image_hosts=True,
                      image_fetch_timeout_s=120)
    yield from serving(cfg)


def _post(url: str, key: str, image: bool = False, **extra) -> requests.Response:
    content = [{"type": "text", "text": QUESTION}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": png_data_uri()}})
    body = {"model": "medvl", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}
    return requests.post(f"{url}/v1/chat/completions", json=body, timeout=60,
                         headers={"Authorization": f"Bearer {key}"})


@pytest.mark.slow
def test_docs_pages_are_off_and_the_spec_stays(guarded):
    assert requests.get(f"{guarded}/docs", timeout=10).status_code == 404
    assert requests.get(f"{guarded}/redoc", timeout=10).status_code == 404
    assert requests.get(f"{guarded}/openapi.json", timeout=10).status_code == 200


def _half_sent(url: str, key: str) -> socket.socket:
    """An authenticated POST whose body never finishes: it holds its slot until body_timeout_s."""
    s = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=20)
    s.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
               "Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n{\"model\": ").encode())
    return s


@pytest.mark.slow
def test_one_key_cannot_take_every_slot(guarded):
    """Key A with two requests in flight gets a 429 with Retry-After; key B is answered; A is
    answered again once its requests end (before: no per-key limit, A's third got in)."""
    held = [_half_sent(guarded, KEY_A) for _ in range(2)]
    try:
        time.sleep(1)  # both reached the replica
        busy = _post(guarded, KEY_A)
        assert busy.status_code == 429, busy.text
        assert int(busy.headers["Retry-After"]) >= 1
        assert busy.json()["error"]["code"] == "too_many_concurrent_requests"
        assert _post(guarded, KEY_B).status_code == 200
    finally:
        for s in held:
            s.close()
    deadline = time.time() + 20
    while (r := _post(guarded, KEY_A)).status_code == 429 and time.time() < deadline:
        time.sleep(0.5)
    assert r.status_code == 200, r.text
    for _ in range(3):  # a finished stream gives its slot back: a third would be a 429 otherwise
        r = _post(guarded, KEY_A, stream=True)
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]"), r.text


@pytest.mark.slow
def test_errors_say_what_was_wrong_and_carry_the_request_id(guarded):
    for r, code in [(_post(guarded, "sk-wrong"), "invalid_api_key"),
                    (_post(guarded, KEY_A, model="gpt-9"), "model_not_found")]:
        err = r.json()["error"]
        assert err["code"] == code and err["message"]
        assert err["request_id"] == r.headers["x-request-id"]


@pytest.mark.slow
def test_server_errors_keep_exception_text_in_the_server_log(guarded):
    """The engine's ValueError (a remote traceback with paths and the node's address) is in
    the front's log under the request id; the client gets a 500 naming only that id."""
    import ray

    r = _post(guarded, KEY_A, image=True)
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["request_id"] == r.headers["x-request-id"]
    for leak in ("Traceback", "Error", "File ", "/", ray.util.get_node_ip_address()):
        assert leak not in err["message"], err["message"]
    logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs", "serve")
    mark = f"request {err['request_id']}: generation failed"
    deadline = time.time() + 20
    while time.time() < deadline:
        for path in glob.glob(f"{logs}/replica_*MedVLChat*.log"):
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
            if mark in text and "ValueError" in text[text.index(mark):]:
                return
        time.sleep(0.5)
    pytest.fail(f"no {mark!r} with its exception text in {logs}")


@pytest.mark.slow
def test_max_tokens_is_capped_by_the_front(guarded):
    """A request for 100000 tokens gets at most ``max_tokens_cap`` (4 here), not an error: the
    front caps it for every engine (vLLM's is checked by ``make vllm-check``)."""
    r = _post(guarded, KEY_A, max_tokens=100_000)
    assert r.status_code == 200, r.text
    assert 1 <= r.json()["usage"]["completion_tokens"] <= 4


@pytest.mark.slow
def test_a_client_gone_mid_decode_keeps_its_slot_until_the_decode_ends(guarded, gate):
    """The slot was given back when the client hung up, while its decode thread ran on: one
    key could start decode after decode. Now it is held until the thread ends."""
    body = json.dumps({"model": "medvl", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": gate.url}}, {"type": "text", "text": QUESTION}]}]})
    socks = []
    for _ in range(2):  # both of key A's slots
        s = socket.create_connection(("127.0.0.1", int(guarded.rsplit(":", 1)[1])), timeout=20)
        s.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY_A}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
        socks.append(s)
    try:
        for _ in socks:
            assert gate.arrived.acquire(timeout=60), "the fetch never reached the image host"
    finally:
        for s in socks:
            s.close()  # the requests are cancelled; their threads wait at the gate
    until = time.time() + 5  # the cancellation reached the replica well within this (< 0.1 s here)
    while time.time() < until:
        r = _post(guarded, KEY_A)
        assert r.status_code == 429, r.text
        time.sleep(0.25)
    gate.opened.set()
    deadline = time.time() + 30
    while (r := _post(guarded, KEY_A)).status_code == 429 and time.time() < deadline:
        time.sleep(0.5)
    assert r.status_code == 200, r.text
