"""vLLM loads an exported model and answers as ``medvl serve`` does (``make vllm-check``).

Two halves in two virtual environments, because vLLM pins its own transformers:

- ``ours`` (the project's venv): our engine's greedy answers to the first question of each
  held-out demo record, with the image decoded by our code and saved as PNG (vLLM reads no
  DICOM), written to a JSON file;
- ``vllm`` (``.venv-vllm``): vLLM on the same directory, prompts built by vLLM from the
  exported chat template and processor (``LLM.chat`` with OpenAI-style messages), greedy;
  every answer must equal ours;
- ``serve`` (``.venv-vllm``): the same directory behind ``backend: vllm`` (``ray.serve.llm``
  on a local Ray, replicas without a GPU, so vLLM's CPU build), asked through the official
  ``openai`` client; its answers must equal ours too.

Exit status 1 on any difference.

Not collected by pytest: vLLM is not installed in the test venv.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys


def ours(model: str, records: str, images: str, out: str, limit: int) -> None:
    import io
    import os

    from PIL import Image

    from medvl.data.dicom import dicom_to_rgb
    from medvl.serving.engine import Engine, Request

    engine = Engine(model)
    cases = []
    with open(records, encoding="utf-8") as f:
        recs = [json.loads(line) for line in f][:limit]
    for rec in recs:
        path = os.path.join(images, rec["image"])
        with open(path, "rb") as f:
            raw = f.read()
        img = Image.fromarray(dicom_to_rgb(raw, 10**8)) if path.endswith(".dcm") else Image.open(path)
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "PNG")
        question = rec["conversations"][0]["value"].replace("<image>", "").strip()
        req = Request(turns=[(f"<image>\n{question}", None)], image=buf.getvalue(), max_tokens=32)
        *_, last = engine.generate_batch([engine.prepare(req)])
        cases.append({"id": rec["id"], "question": question, "answer": last[0].result.text,
                      "png": base64.b64encode(buf.getvalue()).decode()})
    with open(out, "w", encoding="utf-8") as f:
        json.dump(cases, f, ensure_ascii=False)
    print(f"ours: {len(cases)} greedy answers -> {out}")


def _messages(case: dict) -> list[dict]:
    """One user turn in OpenAI's format: the case's PNG and question."""
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{case['png']}"}},
        {"type": "text", "text": case["question"]}]}]


def vllm(model: str, answers: str) -> int:
    from vllm import LLM, SamplingParams

    with open(answers, encoding="utf-8") as f:
        cases = json.load(f)
    llm = LLM(model=model, dtype="float32", max_model_len=512, limit_mm_per_prompt={"image": 1})
    params = SamplingParams(temperature=0.0, max_tokens=32)
    conversations = [_messages(c) for c in cases]
    outputs = llm.chat(conversations, params)
    same = 0
    print(f"{'record':<24} {'same':<5} medvl | vLLM")
    for case, out in zip(cases, outputs, strict=True):
        theirs = out.outputs[0].text.strip()
        same += theirs == case["answer"]
        print(f"{case['id']:<24} {str(theirs == case['answer']):<5} {case['answer']} | {theirs}")
    print(f"vLLM greedy answers equal to medvl's: {same}/{len(cases)}")
    return 0 if same == len(cases) else 1


def serve_vllm(model: str, answers: str, port: int = 18123, cases_n: int = 8) -> int:
    import ray
    from openai import OpenAI
    from ray import serve

    from medvl.serving.api import ServeConfig
    from medvl.serving.vllm import build_vllm_app

    with open(answers, encoding="utf-8") as f:
        cases = json.load(f)[:cases_n]
    ray.init(num_cpus=4, include_dashboard=False)  # logical CPUs: the replica, its bundle, the ingress
    cfg = ServeConfig(model=model, backend="vllm", max_prompt_tokens=256, max_tokens_cap=64)
    options = {"ray_actor_options": {"num_cpus": 1}, "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_vllm_app(cfg, options), blocking=False)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120, max_retries=0)
        print("models:", [m.id for m in client.models.list().data])
        same = 0
        for case in cases:
            r = client.chat.completions.create(model="medvl", max_tokens=32, temperature=0,
                                               messages=_messages(case))
            theirs = (r.choices[0].message.content or "").strip()  # vLLM keeps the space v1 puts first
            same += theirs == case["answer"]
            print(f"{case['id']:<24} {str(theirs == case['answer']):<5} {case['answer']} | {theirs}")
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"backend: vllm (ray.serve.llm) answers through the openai client equal to medvl's: {same}/{len(cases)}")
    return 0 if same == len(cases) else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="side", required=True)
    a = sub.add_parser("ours")
    a.add_argument("--model", required=True)
    a.add_argument("--records", required=True)
    a.add_argument("--images", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--limit", type=int, default=24)
    b = sub.add_parser("vllm")
    b.add_argument("--model", required=True)
    b.add_argument("--answers", required=True)
    c = sub.add_parser("serve")
    c.add_argument("--model", required=True)
    c.add_argument("--answers", required=True)
    args = parser.parse_args()
    if args.side == "ours":
        ours(args.model, args.records, args.images, args.out, args.limit)
    elif args.side == "vllm":
        sys.exit(vllm(args.model, args.answers))
    else:
        sys.exit(serve_vllm(args.model, args.answers))


if __name__ == "__main__":  # vLLM spawns worker processes that re-import this module
    main()
