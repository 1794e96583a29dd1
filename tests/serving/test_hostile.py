"""Hostile requests found by a review (issue 31, part 4): each is refused, or made harmless,
before it can reach the model or hold the front's event loop."""

import base64
import json
import threading
import time

import pytest
import requests
from pydantic import ValidationError

from medvl.data.limits import ImageError
from medvl.data.templates import IMAGE
from medvl.serving.api import (
    MAX_MESSAGES,
    APIError,
    ChatCompletionRequest,
    ServeConfig,
    parse_request,
    strip_image_tags,
    to_engine_request,
)
from tests.conftest import free_port

CFG = ServeConfig()


def _request(*messages: dict, **kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "medvl", "messages": list(messages), **kw})


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


@pytest.mark.parametrize("text", ["<im<image>age>", "a<i<im<image>age>mage>b", "<image><image>", "<<image>image>>"])
def test_no_image_tag_survives_in_any_turn(text):
    """One pass of ``replace`` left ``<im<image>age>`` as ``<image>``: image tokens without
    an image (and a batch beside image requests could fail whole)."""
    req = to_engine_request(_request(_user(text), {"role": "assistant", "content": text}, _user(text)), CFG)
    assert req.image is None
    assert not any(IMAGE in q or IMAGE in (a or "") for q, a in req.turns)


def test_stripping_is_a_fixed_point_in_one_linear_pass():
    nested = "<im" * 5000 + "<image>" + "age>" * 5000
    assert strip_image_tags(nested) == "" and strip_image_tags("x<im" + "<image>" + "age>y") == "xy"
    assert strip_image_tags("no tags: <imag e> <IMAGE>") == "no tags: <imag e> <IMAGE>"


@pytest.mark.parametrize("stop", [["a", "b", "c", "d", "e"], "x" * 200_000, ["ok", "y" * 300]])
def test_stop_is_capped_in_count_and_length(stop):
    """OpenAI allows 4 stops; the engine checks every prefix of every stop against the
    text each step (one 200k-character stop: 0.48 s per step on the replica's thread)."""
    with pytest.raises(ValidationError):
        _request(_user("hi"), stop=stop)
    assert _request(_user("hi"), stop=["a", "b", "c", "d" * 256]).stop[-1] == "d" * 256


def test_messages_are_capped_in_number():
    with pytest.raises(ValidationError):
        _request(*[_user("hi")] * (MAX_MESSAGES + 1))
    with pytest.raises(ValidationError):
        _request({"role": "user", "content": [{"type": "text", "text": "a"}] * 10_000})


@pytest.mark.parametrize("role", ["system", "developer"])
def test_system_messages_count_toward_the_prompt_bound(role):
    """System messages skipped the character check: megabytes of them went through."""
    big = "x" * (32 * CFG.max_prompt_tokens + 1)
    with pytest.raises(APIError) as e:
        to_engine_request(_request({"role": role, "content": big}, _user("hi")), CFG)
    assert e.value.status == 400 and e.value.code == "context_length_exceeded"


def test_an_image_in_a_system_message_is_refused_not_dropped():
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(APIError) as e:
        to_engine_request(_request({"role": "system", "content": [image]}, _user("hi")), CFG)
    assert e.value.status == 400


def test_chat_with_a_directory_for_an_image_is_one_line(taught_model_dir, tmp_path, capsys):
    """`medvl chat --image DIR` ended in pyarrow's OSError traceback after loading the model."""
    from medvl.cli import main

    with pytest.raises(SystemExit) as e:
        main(["chat", "--model", taught_model_dir, "--image", str(tmp_path), "问"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "is a directory" in err, err


def test_the_pipeline_probe_keeps_its_image_under_the_root(tmp_path):
    """The probe joined image_root with the record's path unguarded (``image_uri`` refuses
    ``..`` everywhere else); refused before any file is read or request sent."""
    from medvl.data.records import Reject
    from medvl.pipeline import probe

    rec = {"id": "e1", "image": "../../etc/shadow",
           "conversations": [{"from": "human", "value": "<image>\n问"}, {"from": "gpt", "value": "答"}]}
    (tmp_path / "eval.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(Reject) as e:
        probe(f"http://127.0.0.1:{free_port()}/v1", "medvl", str(tmp_path / "eval.jsonl"), str(tmp_path))
    assert e.value.reason == "path_outside_root"


def test_a_body_of_countless_values_is_refused_before_it_is_parsed():
    """20 MB of tiny JSON values took pydantic a second holding the GIL (a thread alone
    would still freeze the event loop); they are counted at memchr speed first."""
    raw = json.dumps({"model": "medvl", "messages": [{"role": "system", "content": "x"}] * 30_000}).encode()
    with pytest.raises(APIError) as e:
        parse_request(raw)
    assert e.value.status == 400 and e.value.code == "request_too_complex"
    ok = parse_request(json.dumps({"model": "medvl", "messages": [_user("a, b: [c]")] * MAX_MESSAGES}).encode())
    assert len(ok.messages) == MAX_MESSAGES


@pytest.fixture(scope="module")
def roomy_server(ray_cluster, taught_model_dir):
    """The Serve app with the default limits (a 20 MB body)."""
    from ray import serve

    from medvl.serving.app import run_local
    from tests.serving.conftest import wait_healthy

    port = free_port()
    run_local(ServeConfig(model=taught_model_dir), port=port, blocking=False,
              options={"ray_actor_options": {"num_cpus": 0.5}})
    wait_healthy(f"http://127.0.0.1:{port}")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.mark.slow
def test_a_huge_body_does_not_freeze_the_front(roomy_server):
    """A body is parsed on the event loop: 19.8 MB of system messages took 5.9 s, and a
    million tiny ones (18 MB) still 3.6 s with the caps, during which no other request on
    that replica moved. Small requests beside it now answer at once (2 s: room for a loaded CI
    machine, well under the 3.6 s the loop froze)."""
    body = ('{"model": "medvl", "messages": [' + ",".join(['{"role": "system"}'] * 1_000_000) + "]}").encode()
    assert len(body) < ServeConfig().max_body_bytes
    done: dict = {}

    def post() -> None:
        done["r"] = requests.post(f"{roomy_server}/v1/chat/completions", data=body, timeout=120,
                                  headers={"Content-Type": "application/json"})

    worker = threading.Thread(target=post)
    worker.start()
    slowest = 0.0
    while worker.is_alive():
        start = time.perf_counter()
        assert requests.get(f"{roomy_server}/v1/models", timeout=60).status_code == 200
        slowest = max(slowest, time.perf_counter() - start)
    worker.join()
    assert slowest < 2.0, f"a small request waited {slowest:.1f} s behind the big body"
    assert done["r"].status_code == 400 and done["r"].json()["error"]["code"] == "request_too_complex"


def test_burned_in_dicom_is_refused_unless_the_config_allows_it(taught_model_dir):
    from medvl.serving.engine import Preparer, Request
    from tests.data.test_hostile import deflated_dicom

    preparer = Preparer(taught_model_dir)
    req = Request(turns=[(f"{IMAGE}\n问", None)], image=deflated_dicom(512, BurnedInAnnotation="YES"),
                  image_name="upload.dcm")
    with pytest.raises(ImageError) as e:
        preparer.prepare(req)
    assert e.value.reason == "burned_in_annotation"
    assert preparer.prepare(req, allow_burned_in=True).pixels.shape == (32, 32, 3)


@pytest.mark.slow
def test_the_endpoint_refuses_burned_in_dicom_by_default(roomy_server):
    from tests.data.test_hostile import deflated_dicom

    uri = "data:application/dicom;base64," + base64.b64encode(deflated_dicom(512, BurnedInAnnotation="YES")).decode()
    r = requests.post(f"{roomy_server}/v1/chat/completions", timeout=60, json={"model": "medvl", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "问"}]}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "burned_in_annotation"


# --- a security review of the served front (keyless roomy_server: loopback, no keys) -------
MALFORMED_URLS = ["http://[::1", "https://[evil", "http://a]b/"]


def _image_message(url: str) -> dict:
    return {"model": "medvl", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "问"}]}]}


@pytest.mark.slow
@pytest.mark.parametrize("url", MALFORMED_URLS)
def test_a_malformed_image_url_is_a_400_on_both_endpoints(roomy_server, url):
    """urlsplit's ValueError was a 500 with a traceback at ERROR."""
    for path, body, param in [("/v1/images/preview", {"image_url": {"url": url}}, "image_url"),
                              ("/v1/chat/completions", _image_message(url), "messages")]:
        r = requests.post(f"{roomy_server}{path}", json=body, timeout=60)
        assert r.status_code == 400, (path, r.text)
        assert r.json()["error"]["code"] == "invalid_image_url" and r.json()["error"]["param"] == param


@pytest.mark.slow
def test_the_preview_counts_json_values_before_parsing(roomy_server):
    """The preview parsed its body without the chat endpoint's value count."""
    body = json.dumps({"image_url": {"url": "x"}, "pad": [0] * 100_000}).encode()
    r = requests.post(f"{roomy_server}/v1/images/preview", data=body, timeout=60,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "request_too_complex", r.text


@pytest.mark.slow
def test_a_jpeg_of_countless_scans_is_a_400_on_both_endpoints(roomy_server):
    from tests.data.test_images import scan_bomb

    uri = "data:image/jpeg;base64," + base64.b64encode(scan_bomb(256, 256, 400)).decode()
    for path, body in [("/v1/images/preview", {"image_url": {"url": uri}}),
                       ("/v1/chat/completions", _image_message(uri))]:
        r = requests.post(f"{roomy_server}{path}", json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_scans", (path, r.text)


@pytest.mark.slow
@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "10.0.0.1", "127.0.0.1.evil.example"])
def test_a_keyless_server_answers_only_loopback_hosts(roomy_server, host):
    """DNS rebinding: a page whose name now resolves to 127.0.0.1 could read the answers."""
    for r in [requests.get(f"{roomy_server}/v1/models", headers={"Host": host}, timeout=60),
              requests.post(f"{roomy_server}/v1/chat/completions", headers={"Host": host}, timeout=60,
                            json=_image_message("http://x"))]:
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed", r.text
    port = roomy_server.rsplit(":", 1)[1]
    for ok in ["127.0.0.1", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST"]:
        assert requests.get(f"{roomy_server}/v1/models", headers={"Host": ok}, timeout=60).status_code == 200


@pytest.mark.slow
@pytest.mark.parametrize("media", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_a_keyless_server_takes_only_json_posts(roomy_server, media):
    """A form or a text/plain fetch from any web page needs no CORS preflight."""
    body = json.dumps(_image_message("http://x")).encode()
    headers = {"Content-Type": media} if media else {}
    for path in ["/v1/chat/completions", "/v1/images/preview"]:
        r = requests.post(f"{roomy_server}{path}", data=body, headers=headers, timeout=60)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", r.text
    r = requests.post(f"{roomy_server}/v1/chat/completions", data=body, timeout=60,
                      headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_image_url", r.text  # past the check


@pytest.mark.slow
def test_no_redirect_is_built_from_the_host_header(roomy_server):
    r = requests.get(f"{roomy_server}/web/style.css/", headers={"Host": "evil.example"}, timeout=60,
                     allow_redirects=False)
    assert r.status_code == 404 and "location" not in r.headers


@pytest.mark.slow
def test_a_client_gone_mid_upload_is_not_a_server_error(roomy_server):
    """Starlette's ClientDisconnect from the body read went to the catch-all handler: a
    40-line traceback at ERROR per dropped upload."""
    import glob
    import os
    import socket
    import uuid

    import ray

    logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs", "serve")

    def lines(rid: str) -> list[str]:
        found = []
        for path in glob.glob(f"{logs}/replica_*MedVLChat*.log"):
            with open(path, encoding="utf-8", errors="replace") as f:
                found += [line for line in f if rid in line or "ClientDisconnect" in line]
        return found

    def answered(rid: str) -> bool:
        return any("POST /v1/chat/completions" in line for line in lines(rid))

    # The drop must come while the replica reads the body (a body dropped before the proxy
    # hands it over is only cancelled, and logs nothing): hold longer when the machine is slow.
    for hold in (0.3, 1.5, 4.0):
        rid = uuid.uuid4().hex
        with socket.create_connection(("127.0.0.1", int(roomy_server.rsplit(":", 1)[1])), timeout=20) as s:
            s.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-ID: {rid}\r\n"
                       "Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n"
                       + "x" * 100_000).encode())
            time.sleep(hold)
        deadline = time.time() + 10
        while not answered(rid) and time.time() < deadline:
            time.sleep(0.5)
        if answered(rid):
            break
    time.sleep(2)  # the handler's own lines may follow the access line
    assert answered(rid), f"no access line for {rid} in {logs}"
    assert not any("failed" in line or "ClientDisconnect" in line for line in lines(rid)), lines(rid)
