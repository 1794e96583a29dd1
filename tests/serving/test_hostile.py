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
