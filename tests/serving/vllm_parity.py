"""vLLM answers as ``medvl serve`` does, alone and behind our front (``make vllm-check``).

Three parts in two virtual environments, because vLLM pins its own transformers:

- ``ours`` (the project's venv): our engine's greedy answers to the first question of each
  held-out demo record, the image given as its file (DICOM included) and decoded by our
  code; written to a JSON file with the file and a PNG of the decoded image;
- ``vllm`` (``.venv-vllm``): vLLM alone on the same directory, prompts built by vLLM from the
  exported chat template and processor (``LLM.chat``, the PNGs: vLLM reads no DICOM);
  every answer must equal ours;
- ``front`` (``.venv-vllm``): ``backend: vllm`` on a local Ray, i.e. our HTTP front with
  vLLM's CPU build as the engine, over real HTTP on 127.0.0.1 through the official
  ``openai`` client: the original files (DICOM as ``application/dicom``) must give our
  answers, 16 clients at once; and the front's guarantees hold with vLLM behind it: no key
  401, remote URL outside the allow-list 400, over-limit upload 413, ``max_tokens`` capped,
  a poisoned request among ordinary ones fails alone, a stream equals its completion.

Exit status 1 on any difference. Not collected by pytest: vLLM is not installed in the test venv.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys

KEY = "sk-vllm-check"
CAP = 24  # the front's max_tokens_cap here


def ours(model: str, records: str, images: str, out: str, limit: int) -> None:
    import io

    from PIL import Image

    from medvl.serving.engine import Engine, Request

    engine = Engine(model)
    cases = []
    with open(records, encoding="utf-8") as f:
        recs = [json.loads(line) for line in f][:limit]
    for rec in recs:
        with open(os.path.join(images, rec["image"]), "rb") as f:
            raw = f.read()
        question = rec["conversations"][0]["value"].replace("<image>", "").strip()
        req = Request(turns=[(f"<image>\n{question}", None)], image=raw, image_name=rec["image"], max_tokens=32)
        prepared = engine.prepare(req)
        *_, last = engine.generate_batch([prepared])
        png = io.BytesIO()
        Image.fromarray(prepared.pixels).save(png, "PNG")  # what our loader made of the file
        dicom = rec["image"].endswith(".dcm")
        cases.append({"id": rec["id"], "question": question, "answer": last[0].result.text,
                      "file": base64.b64encode(raw).decode(), "mime": "application/dicom" if dicom else "image/png",
                      "png": base64.b64encode(png.getvalue()).decode()})
    with open(out, "w", encoding="utf-8") as f:
        json.dump(cases, f, ensure_ascii=False)
    dicoms = sum(c["mime"] == "application/dicom" for c in cases)
    print(f"ours: {len(cases)} greedy answers ({dicoms} of DICOM files) -> {out}")


def _messages(case: dict, png: bool = False) -> list[dict]:
    """One user turn in OpenAI's format: the case's image (its file, or the PNG) and question."""
    url = f"data:image/png;base64,{case['png']}" if png else f"data:{case['mime']};base64,{case['file']}"
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": case["question"]}]}]


def _compare(cases: list[dict], answers: list[str], what: str) -> int:
    same = 0
    print(f"{'record':<24} {'same':<5} medvl | {what}")
    for case, theirs in zip(cases, answers, strict=True):
        same += theirs == case["answer"]
        print(f"{case['id']:<24} {str(theirs == case['answer']):<5} {case['answer']} | {theirs}")
    print(f"{what} greedy answers equal to medvl's: {same}/{len(cases)}")
    return same == len(cases)


def vllm(model: str, answers: str) -> int:
    from vllm import LLM, SamplingParams

    with open(answers, encoding="utf-8") as f:
        cases = json.load(f)
    llm = LLM(model=model, dtype="float32", max_model_len=512, limit_mm_per_prompt={"image": 1})
    outputs = llm.chat([_messages(c, png=True) for c in cases], SamplingParams(temperature=0.0, max_tokens=32))
    return 0 if _compare(cases, [o.outputs[0].text.strip() for o in outputs], "vLLM alone") else 1


def front(model: str, answers: str, keys: str) -> int:
    """Our front with vLLM behind it: every check of the module doc; 1 if any fails."""
    import ray
    from ray import serve

    from medvl.serving.api import ServeConfig
    from medvl.serving.app import run_local

    with open(answers, encoding="utf-8") as f:
        cases = json.load(f)
    with open(keys, "w") as f:
        f.write(KEY + "\n")
    largest = max(len(c["file"]) for c in cases)
    cfg = ServeConfig(model=model, backend="vllm", api_key_file=keys, max_prompt_tokens=256, max_tokens_cap=CAP,
                      max_body_bytes=largest + 20_000)
    ray.init(num_cpus=4, include_dashboard=False)  # logical CPUs: the engine replica and the front
    port = _free_port()
    try:
        run_local(cfg, port=port, blocking=False, options={"ray_actor_options": {"num_cpus": 1}})
        url = f"http://127.0.0.1:{port}"
        ok = [_answers(url, cases), _guarantees(url, cases, cfg.max_body_bytes)]
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0 if all(ok) else 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client(url: str, key: str = KEY):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=key, timeout=300, max_retries=0)


def _answers(url: str, cases: list[dict]) -> bool:
    """Every held-out case from its file, 16 clients at once (vLLM batches them)."""
    from concurrent.futures import ThreadPoolExecutor

    client = _client(url)

    def ask(case: dict) -> str:
        r = client.chat.completions.create(model="medvl", max_tokens=32, temperature=0, messages=_messages(case))
        return r.choices[0].message.content or ""

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, cases))
    return _compare(cases, got, "our front + vLLM")


def _guarantees(url: str, cases: list[dict], body_limit: int) -> bool:
    """The front's checks with vLLM behind it, each printed with its outcome."""
    from concurrent.futures import ThreadPoolExecutor

    import requests

    case = next(c for c in cases if c["mime"] == "application/dicom")

    def post(messages, key=KEY, **extra):
        body = {"model": "medvl", "messages": messages, "max_tokens": 32, **extra}
        r = requests.post(f"{url}/v1/chat/completions", json=body, timeout=300,
                          headers={"Authorization": f"Bearer {key}"} if key else {})
        return r.status_code, r.json()

    def content(result):
        status, body = result
        return body["choices"][0]["message"]["content"] if status == 200 else f"HTTP {status}"

    remote = [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "http://169.254.169.254/latest/meta-data/x.png"}}, {"type": "text", "text": case["question"]}]}]
    too_big = [{"role": "user", "content": "x" * body_limit}]
    checks = {
        "no key: 401": post(_messages(case), key=None)[0] == 401,
        "DICOM answered as our engine answers it": content(post(_messages(case))) == case["answer"],
        "remote image URL outside the allow-list: 400": post(remote)[0] == 400,
        "over-limit upload: 413": post(too_big)[0] == 413,
        "max_tokens 100000 capped": post(_messages(case), max_tokens=100_000)[1]
        ["usage"]["completion_tokens"] <= CAP,
        "stream equals completion": _streamed(url, case) == content(post(_messages(case))),
    }
    poisoned = [{"seed": 2**63}, {"messages": _messages({**case, "file": "@@@"})},
                {"messages": _messages({**case, "file": base64.b64encode(b"not an image").decode()})}]
    ordinary = [{}] * 8 + [{"temperature": 1e-38, "seed": 3}]  # below MIN_TEMPERATURE: greedy
    with ThreadPoolExecutor(len(poisoned) + len(ordinary)) as pool:
        results = list(pool.map(lambda extra: post(**{"messages": _messages(case), **extra}), poisoned + ordinary))
    checks["poisoned requests fail alone (4xx), the 9 beside them answered"] = (
        all(400 <= s < 500 for s, _ in results[:len(poisoned)])
        and all(content(r) == case["answer"] for r in results[len(poisoned):]))
    for name, passed in checks.items():
        print(f"{'PASS' if passed else 'FAIL'}  {name}")
    return all(checks.values())


def _streamed(url: str, case: dict) -> str:
    stream = _client(url).chat.completions.create(model="medvl", max_tokens=32, temperature=0, stream=True,
                                                  messages=_messages(case))
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="side", required=True)
    a = sub.add_parser("ours")
    a.add_argument("--model", required=True)
    a.add_argument("--records", required=True)
    a.add_argument("--images", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--limit", type=int, default=24)
    for name in ("vllm", "front"):
        b = sub.add_parser(name)
        b.add_argument("--model", required=True)
        b.add_argument("--answers", required=True)
    args = parser.parse_args()
    if args.side == "ours":
        ours(args.model, args.records, args.images, args.out, args.limit)
    elif args.side == "vllm":
        sys.exit(vllm(args.model, args.answers))
    else:
        sys.exit(front(args.model, args.answers, os.path.join(os.path.dirname(args.answers), "vllm_keys.txt")))


if __name__ == "__main__":  # vLLM spawns worker processes that re-import this module
    main()
