"""``medvl pipeline``: corpus -> served model as one Ray job (what ``ray job submit`` runs).

Steps, in order: demo-data (demo recipes only) -> preprocess-alignment ->
preprocess-instruction -> stage1 -> stage2 -> evaluate -> export -> deploy. Each is a plain
function call on the job's Ray cluster (Ray Data, Ray Train, Ray Serve do the distributing)
writing under the run URI, and ends by writing ``_SUCCESS`` in its artifact directory: the
hash of its config, raw inputs and upstream markers, plus its result. A re-run skips every
step whose marker hash matches and redoes the rest, so a crashed job resumes where it
stopped; a step that crashed mid-way with an unchanged config resumes from its own Ray
Train checkpoints, while a step whose config changed starts from an empty directory.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from medvl import config, storage
from medvl.console import init_ray
from medvl.data.preprocess import PreprocessConfig
from medvl.eval.evaluate import EvalConfig
from medvl.placement import (
    Placement,
    check_accelerator,
    check_serve_backend,
    deployment_options,
    front_options,
)
from medvl.preflight import check_inputs, check_shared_storage
from medvl.rerun import conflict, differences, plain, save_config
from medvl.serving.api import ServeConfig
from medvl.summary import write_summary
from medvl.train.config import TrainConfig

STEPS = ("demo-data", "preprocess-alignment", "preprocess-instruction", "stage1", "stage2",
         "evaluate", "export", "deploy")
MARKER, STARTED = "_SUCCESS", "_STARTED"


@dataclass
class DemoDataConfig:
    output: str = field(default="", metadata={"help": "where `medvl demo-data` writes the corpus"})
    variants: int = field(default=10, metadata={"help": "augmented copies per training image"})
    seed: int = field(default=0, metadata={"help": "augmentation seed"})


@dataclass
class DeployConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "HTTP address (0.0.0.0 on a cluster)"})
    port: int = field(default=8000, metadata={"help": "HTTP port of Serve's proxy"})
    num_cpus: float = field(default=1.0, metadata={"help": "CPUs per replica"})
    num_gpus: float = field(default=0.0, metadata={"help": "GPUs per replica (on placement.serve_accelerator)"})
    min_replicas: int = field(default=1, metadata={"help": "Serve autoscaling: fewest replicas (2+ on a cluster)"})
    max_replicas: int = field(default=1, metadata={"help": "Serve autoscaling: most replicas"})
    probe: str = field(default="", metadata={"help": "records to pick the check request from (default: eval.data)"})


@dataclass
class Recipe:
    """A whole recipe file: the run URI and one section per step."""

    run: str = ""
    preprocess_alignment: PreprocessConfig = field(default_factory=PreprocessConfig)
    preprocess_instruction: PreprocessConfig = field(default_factory=PreprocessConfig)
    stage1: TrainConfig = field(default_factory=TrainConfig)
    stage2: TrainConfig = field(default_factory=lambda: TrainConfig(stage=2))
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    placement: Placement = field(default_factory=Placement)
    demo_data: DemoDataConfig | None = None


@dataclass
class Step:
    name: str
    artifact: str  # directory URI holding the step's outputs and its _SUCCESS marker
    config: Any  # hashed: a change re-runs the step
    run: Callable[[bool], dict]  # (resume a saved run of another config) -> the result for marker + summary
    deps: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()  # raw input files, fingerprinted by size + mtime
    owns_config: bool = False  # training writes and checks its own config.yaml (rerun.py)


# Steps whose output is a copy or a live app: re-running them loses nothing, so a changed
# config simply redoes them (no --overwrite needed).
REPLACEABLE = ("export", "deploy")


def load_recipe(path: str, run: str | None = None) -> Recipe:
    recipe = config.from_dict(Recipe, config.read_recipe(path, run))
    if not recipe.run:
        raise ValueError(f"{path}: a top-level `run` URI (or --output) is required")
    return recipe


def build_steps(r: Recipe, owned_ray: bool, keep_serving: bool) -> list[Step]:
    """The step graph of a recipe; artifacts are the recipe's own output URIs."""
    from medvl.data.demo import build_demo_data
    from medvl.data.preprocess import preprocess
    from medvl.eval.evaluate import evaluate
    from medvl.train.trainer import train

    model = storage.join(r.run, "model")
    steps = []
    if r.demo_data is not None:
        d = r.demo_data
        steps.append(Step("demo-data", d.output, d,
                          lambda _: {"counts": build_demo_data(storage.absolute(d.output), d.variants, d.seed)}))
    data_dep = ("demo-data",) if r.demo_data is not None else ()
    for name, cfg in (("preprocess-alignment", r.preprocess_alignment),
                      ("preprocess-instruction", r.preprocess_instruction)):
        steps.append(Step(name, cfg.output, cfg, lambda _, c=cfg: _counts(preprocess(c, r.placement)), data_dep,
                          (cfg.data,)))
    steps += [
        Step("stage1", r.stage1.output, r.stage1, lambda resume: train(r.stage1, r.placement, resume),
             ("preprocess-alignment",), owns_config=True),
        Step("stage2", r.stage2.output, r.stage2, lambda resume: train(r.stage2, r.placement, resume),
             ("stage1", "preprocess-instruction"), owns_config=True),
        Step("evaluate", r.eval.output, r.eval, lambda _: _eval_result(evaluate(r.eval, r.placement)),
             ("stage2", *data_dep), (r.eval.data,)),
        Step("export", model, {"from": storage.join(r.stage2.output, "hf")},
             lambda _: _export(storage.join(r.stage2.output, "hf"), model), ("stage2",)),
        Step("deploy", storage.join(r.run, "deploy"), {"serve": r.serve, "deploy": r.deploy},
             lambda _: deploy(r, model, owned_ray, keep_serving), ("export", *data_dep)),
    ]
    return steps


def _counts(manifest: dict) -> dict:
    return {k: manifest[k] for k in ("records_in", "records_kept", "records_rejected", "rejects_by_reason")}


def _eval_result(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("n", "errors", "closed_chance", "overall", "by_answer_type", "by_task")}


def _export(src: str, dst: str) -> dict:
    """The served model: stage 2's HF directory, copied to ``RUN/model``."""
    storage.copy_dir(src, dst)
    return {"model": dst, "files": len(storage.list_files(dst))}


def fingerprint(step: Step, markers: dict[str, dict]) -> dict:
    """What a step's result depends on: its config (fields that change the result), its raw
    inputs' size + mtime, and its upstream steps' completions (a re-run upstream re-runs us)."""
    missing = [u for u in step.inputs if not storage.exists(u)]
    if missing:
        raise ValueError(f"{step.name}: {missing[0]} does not exist")
    return {"step": step.name, "config": plain(step.config, results_only=True),
            "inputs": {u: storage.stamp(u) for u in step.inputs},
            "deps": {d: [markers[d]["hash"], markers[d]["finished_at"]] for d in step.deps if d in markers}}


def step_hash(step: Step, markers: dict[str, dict]) -> str:
    text = json.dumps(fingerprint(step, markers), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_marker(artifact: str, name: str = MARKER) -> dict | None:
    uri = storage.join(artifact, name)
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else None


def select(names: list[str], only: str | None, start: str | None, until: str | None) -> list[str]:
    for s in (only, start, until):
        if s is not None and s not in names:
            raise ValueError(f"unknown step {s!r}; steps of this recipe: {', '.join(names)}")
    if only:
        return [only]
    lo = names.index(start) if start else 0
    hi = names.index(until) + 1 if until else len(names)
    return names[lo:hi]


def run_pipeline(path: str, output: str | None = None, only: str | None = None, start: str | None = None,
                 until: str | None = None, keep_serving: bool = False, force: bool = False,
                 resume: bool = False, overwrite: bool = False) -> dict:
    """Run the selected steps of a recipe, skipping completed ones; write and return the summary.
    A step whose output holds a run of another config stops the run unless ``resume`` (keep
    or continue the saved run) or ``overwrite`` (delete it, redo the step)."""
    recipe = load_recipe(path, output)
    owned = not os.environ.get("RAY_ADDRESS")  # `ray job submit` sets it; `make demo` does not
    steps = build_steps(recipe, owned, keep_serving)
    chosen = select([s.name for s in steps], only, start, until)
    check_recipe_inputs(recipe)
    init_ray()
    if "deploy" in chosen:  # a backend missing on the serve nodes fails now, not after training
        check_serve_backend(recipe.serve.backend, recipe.deploy.num_cpus, recipe.deploy.num_gpus,
                            recipe.placement)
    check_shared_storage(recipe.run, "run")  # every step on every node writes under it
    markers = {s.name: m for s in steps if (m := read_marker(s.artifact))}
    status: dict[str, dict] = {}
    outputs = {"stage1": recipe.stage1.output, "stage2": recipe.stage2.output, "eval": recipe.eval.output}
    for step in steps:
        if step.name not in chosen:
            status[step.name] = {"status": "complete" if step.name in markers else "not run"}
            continue
        try:
            status[step.name] = run_or_skip(step, markers, Rerun(force, resume, overwrite),
                                            lambda s=step: _redeploy(s, owned, keep_serving))
        except BaseException:  # the summary says where the run stopped, then the job fails
            status[step.name] = {"status": "failed"}
            write_summary(recipe.run, outputs, path, markers, status)
            raise
    return write_summary(recipe.run, outputs, path, markers, status)


@dataclass(frozen=True)
class Rerun:
    force: bool = False  # redo complete steps whose config did not change
    resume: bool = False  # a step holding a run of another config: keep it / continue it as saved
    overwrite: bool = False  # ... delete it and redo the step


def run_or_skip(step: Step, markers: dict[str, dict], how: Rerun, redeploy: Callable[[], bool]) -> dict:
    """Skip a step whose marker matches its fingerprint, else run it; return its status entry."""
    missing = [d for d in step.deps if d not in markers]
    if missing:
        raise ValueError(f"step {step.name} needs {', '.join(missing)} to have completed first")
    now = fingerprint(step, markers)
    digest = step_hash(step, markers)
    done = markers.get(step.name)
    if done and done["hash"] == digest and not how.force and not redeploy():
        print(f"[pipeline] {step.name}: skipped (complete, hash {digest})", flush=True)
        return {"status": "skipped", "seconds": done["seconds"]}
    started = read_marker(step.artifact, STARTED)
    held = next((m for m in (done, started) if m and m["hash"] != digest), None)
    resume = False
    diffs = config_changes(held, now) if held else []
    if diffs and step.name not in REPLACEABLE:
        if how.resume and done and done["hash"] != digest:
            print(f"[pipeline] {step.name}: kept as saved (--resume; its config differs from the recipe's)",
                  flush=True)
            return {"status": "kept", "seconds": done["seconds"]}
        if how.resume and step.owns_config:
            resume = True  # training continues the saved run with its saved config
        elif how.overwrite:
            storage.delete_dir(step.artifact)
        else:
            raise conflict(f"{step.name}: {step.artifact}", diffs)
    elif held:  # same config, but new raw inputs or upstream results (or a copy / a live app)
        print(f"[pipeline] {step.name}: its inputs changed since it ran (or it is a copy / a live app): "
              "redoing it", flush=True)
        storage.delete_dir(step.artifact)
    markers[step.name] = run_step(step, digest, now, resume)
    return {"status": "ran", "seconds": markers[step.name]["seconds"]}


def config_changes(held: dict, now: dict) -> list[str]:
    """The config fields in which a saved run differs from this one (inputs and upstream
    results are not config: a step whose inputs changed is simply redone)."""
    if "fingerprint" not in held:
        return ["saved by an older medvl"]
    return differences(held["fingerprint"]["config"], now["config"])


def run_step(step: Step, digest: str, now: dict, resume: bool) -> dict:
    """Run one step, with ``_STARTED`` (its fingerprint) in its directory while it runs."""
    storage.delete_file(storage.join(step.artifact, MARKER))  # a stale marker must not survive a crash
    if not resume:
        storage.write_text(storage.join(step.artifact, STARTED), json.dumps({"hash": digest, "fingerprint": now}))
    if not step.owns_config:
        save_config(step.artifact, step.config)
    print(f"[pipeline] {step.name}: running (hash {digest})", flush=True)
    t0 = time.time()
    result = step.run(resume)
    marker = {"step": step.name, "hash": digest, "fingerprint": now, "started_at": t0, "finished_at": time.time(),
              "seconds": round(time.time() - t0, 1), "result": result}
    storage.write_text(storage.join(step.artifact, MARKER), json.dumps(marker, ensure_ascii=False, indent=2))
    print(f"[pipeline] {step.name}: done in {marker['seconds']} s", flush=True)
    return marker


def check_recipe_inputs(r: Recipe) -> None:
    """Before Ray starts: every input the recipe names outside its run directory exists (the
    ones inside are written by earlier steps) and every S3 bucket it uses is reachable."""
    sections = {"preprocess_alignment": r.preprocess_alignment, "preprocess_instruction": r.preprocess_instruction,
                "stage1": r.stage1, "stage2": r.stage2, "eval": r.eval}
    fields = ("data", "image_root", "tokenizer", "init", "vision_tower", "llm", "model", "leakage_data")
    inputs = {f"{name}.{f}": storage.absolute(getattr(cfg, f)) for name, cfg in sections.items()
              for f in fields if getattr(cfg, f, "")}
    check_inputs(inputs, outputs=(r.run,), produced=(r.run,))


def _redeploy(step: Step, owned: bool, keep_serving: bool) -> bool:
    """A deployment is a live app, not a file: redo it when the app is not running."""
    if step.name != "deploy":
        return False
    if owned:
        return keep_serving  # a driver-owned Ray's Serve app died with the previous driver
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    try:
        app = serve.status().applications.get("medvl")
    except Exception:  # noqa: BLE001 - Serve not started on this cluster
        app = None
    running = app is not None and app.status == ApplicationStatus.RUNNING
    if not running:
        print("[pipeline] deploy: the Serve app is not running on this cluster: deploying again", flush=True)
    return not running


def deploy(r: Recipe, model: str, owned: bool, keep_serving: bool) -> dict:
    """Serve ``model``, check it with one real request; on a driver-owned Ray, stop unless asked."""
    from ray import serve

    from medvl.serving.app import run_local

    cfg = dataclasses.replace(r.serve, model=model)
    d = r.deploy
    if d.num_gpus:
        check_accelerator(r.placement.serve_accelerator)
    run_local(cfg, d.host, d.port, blocking=False, options=deployment_options(
        d.num_cpus, d.num_gpus, d.min_replicas, d.max_replicas, r.placement),
        front=front_options(d.min_replicas, d.max_replicas, r.placement))
    local = f"http://127.0.0.1:{d.port}"
    sample = probe(f"{local}/v1", cfg.model_name, d.probe or r.eval.data, r.eval.image_root)
    print(f"[pipeline] deploy: asked {sample['question']!r} about {sample['image']}\n"
          f"[pipeline]   answer:   {sample['answer']}\n[pipeline]   expected: {sample['expected']}", flush=True)
    if owned and keep_serving:
        print(f"[pipeline] serving at {local}/v1, web page {local}/, until Ctrl-C", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    if owned:
        serve.shutdown()
        return {"endpoint": f"{local}/v1", "page": f"{local}/", "serving": False, "sample": sample}
    import ray

    host = ray.util.get_node_ip_address() if d.host in ("0.0.0.0", "::") else d.host
    base = f"http://{host}:{d.port}"
    return {"endpoint": f"{base}/v1", "page": f"{base}/", "serving": True, "sample": sample}


MIME = {".dcm": "application/dicom", ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def probe(url: str, model_name: str, records_uri: str, image_root: str) -> dict:
    """One real chat completion through the official ``openai`` client: a held-out image
    (a DICOM file when there is one) with its multiple-choice question."""
    from openai import OpenAI

    from medvl.data.records import image_uri
    from medvl.eval.evaluate import load_eval_records

    examples = load_eval_records(records_uri)
    ex = next((e for e in examples if e["image"].lower().endswith(".dcm") and len(e.get("choices") or []) > 2),
              examples[0])
    data = storage.read_bytes(image_uri(image_root, ex["image"]))  # no ../ out of the root
    mime = MIME.get(os.path.splitext(ex["image"])[1].lower(), "image/png")
    keys = [k for k in os.environ.get("MEDVL_API_KEYS", "").split(",") if k]
    client = OpenAI(base_url=url, api_key=keys[0] if keys else "none", timeout=120, max_retries=5)
    reply = client.chat.completions.create(model=model_name, max_tokens=32, temperature=0, messages=[
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}},
            {"type": "text", "text": ex["question"]}]}])
    return {"image": ex["image"], "question": ex["question"], "answer": reply.choices[0].message.content,
            "expected": ex["answer"]}
