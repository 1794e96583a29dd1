"""``medvl eval``: batch inference over an eval set with Ray Data, then metrics and a report.

Records -> Ray Data -> an actor pool of ``Predictor`` s (the model loaded once per actor,
the pool sized by the recipe) generating greedily in batches -> metrics per example ->
``OUTPUT/{predictions.jsonl, metrics.json, report.md, metrics.png}``. Greedy decoding with
a fixed batch composition and order makes two runs give identical results.

With ``controls`` (the default) every question is also asked with a blank image and with
another record's image, so the report can show whether the scores depend on the image at
all (text-only models keep much of their VQA-RAD score with blank images).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import ray

from medvl import storage
from medvl.console import init_ray
from medvl.data import images, records
from medvl.data.images import PAD_COLOR
from medvl.eval import llava_med
from medvl.eval.bilingual import agreement
from medvl.eval.compare import paired_by_group
from medvl.eval.leakage import PHASH_BITS, find_overlaps
from medvl.eval.metrics import answer_type, score
from medvl.eval.provenance import read_imported, split_hash
from medvl.eval.report import CONTROLS, write_report
from medvl.placement import Placement, actor_options, check_accelerator
from medvl.preflight import check_inputs
from medvl.serving.engine import Engine, Request, read_meta

SHUFFLE_SEED = 0  # the derangement of images in the shuffled control: fixed, so runs compare


@dataclass
class EvalConfig:
    model: str = field(default="", metadata={"help": "exported HF model directory (URI)"})
    data: str = field(default="", metadata={"help": "eval records, .jsonl (ours or `medvl import-vqa` output)"})
    image_root: str = field(default="", metadata={"help": "directory the records' image paths are relative to"})
    output: str = field(default="", metadata={"help": "report directory (URI)"})
    batch_size: int = field(default=16, metadata={"help": "questions generated together per actor"})
    max_tokens: int = field(default=32, metadata={"help": "longest generated answer"})
    replicas: int = field(default=1, metadata={"help": "model actors (one per GPU with use_gpu)"})
    cpus_per_replica: float = field(default=1.0, metadata={"help": "CPUs per model actor"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per model actor (bf16)"})
    limit: int = field(default=0, metadata={"help": "evaluate only the first N records (0: all)"})
    protocol: Literal["medvl", "llava-med"] = field(default="medvl", metadata={
        "help": "llava-med: also score as LLaVA-Med's run_eval.py does, for comparison with published figures"})
    controls: bool = field(default=True, metadata={
        "help": "image-dependence controls, on by default: also answer every question with a blank image and "
                "with another record's image, so the report shows whether scores fall to chance without the "
                "real one (3x the questions); --no-controls asks with the real images only"})
    leakage_data: str = field(default="", metadata={
        "help": "training records (.jsonl): before scoring, every eval image is compared with the images they "
                "name (SHA-256 of the pixels, and a perceptual hash for resized or re-encoded copies) and the "
                "report lists overlaps by question id; unset: the report says leakage was not checked"})
    leakage_image_root: str = field(default="", metadata={
        "help": "directory leakage_data's image paths are relative to; empty: image_root"})
    leakage_drop: bool = field(default=False, metadata={
        "help": "leave out of the scores the questions whose image was found in the training corpus "
                "(default: list them and still score them)"})
    regime: Literal["unstated", "zero-shot", "fine-tuned"] = field(default="unstated", metadata={
        "help": "fine-tuned: the model was trained on this benchmark's train split (stated in the report)"})


def load_eval_records(uri: str, limit: int = 0) -> list[dict]:
    """Eval records with their question history, target answer and type; a bad line is an error
    naming it (an eval set is curated input: silently skipping would change the score)."""
    out = []
    for n, line in enumerate(storage.read_text(uri).splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = records.parse(line)
            rec = records.validate(raw)
        except records.Reject as e:
            raise ValueError(f"{uri}:{n}: {e}") from e
        question, answer = rec.turns[-1]
        ex = {"index": len(out), "id": rec.id, "image": rec.image,
              "prompt": [*rec.turns[:-1], (question, None)],  # earlier turns as given, <image> kept
              "question": question.replace(records.IMAGE, "").strip(), "answer": answer,
              "choices": raw.get("choices"),
              "modality": raw.get("modality") or "unknown", "task": raw.get("task") or "vqa",
              "lang": raw.get("lang"), "pair": raw.get("pair")}  # the same question in another language
        ex["answer_type"] = answer_type({**raw, **ex})
        out.append(ex)
        if limit and len(out) >= limit:
            break
    return out


class Predictor:
    """One model per Ray actor; a batch of examples in, their greedy answers out."""

    def __init__(self, model: str, image_root: str, max_tokens: int, threads: int, device: str):
        import torch

        torch.set_num_threads(max(1, threads))
        self.engine = Engine(model, device=device)
        self.image_root, self.max_tokens = image_root, max_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        examples = [json.loads(x) for x in batch["example"]]
        preds, errors, ready = [""] * len(examples), [""] * len(examples), []
        for i, ex in enumerate(examples):
            try:
                data = storage.read_bytes(records.image_uri(self.image_root, ex["image"]))
                req = Request(turns=[tuple(t) for t in ex["prompt"]], image=data,
                              max_tokens=self.max_tokens)
                prep = self.engine.prepare(req)
                if ex["condition"] == "blank":  # same size as the fitted image, no content
                    prep.pixels = np.broadcast_to(np.asarray(PAD_COLOR, np.uint8), prep.pixels.shape).copy()
                ready.append((i, prep))
            except (records.Reject, images.ImageError, OSError) as e:
                errors[i] = f"{type(e).__name__}: {e}"  # scored as a wrong answer, and listed
        if ready:
            for chunks in self.engine.generate_batch([p for _, p in ready]):
                for (i, _), chunk in zip(ready, chunks, strict=True):
                    if chunk is not None and chunk.result is not None:
                        preds[i] = chunk.result.text
        return {"index": batch["index"].tolist(), "prediction": preds, "error": errors}


def predict(cfg: EvalConfig, examples: list[dict], placement: Placement) -> list[dict]:
    """Greedy answers for ``examples`` from a pool of ``cfg.replicas`` model actors on the
    serving node type (sized by the recipe, not by whatever nodes happen to be up)."""
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    batches = math.ceil(len(examples) / cfg.batch_size)
    pool = max(1, min(batches, cfg.replicas))
    items = [{"index": ex["index"], "example": json.dumps(ex, ensure_ascii=False)} for ex in examples]
    ds = ray.data.from_items(items, override_num_blocks=max(1, batches))
    ds = ds.map_batches(
        Predictor, batch_size=cfg.batch_size, compute=ray.data.ActorPoolStrategy(size=pool),
        **actor_options(cfg.cpus_per_replica, 1 if cfg.use_gpu else 0, placement),
        fn_constructor_kwargs={"model": cfg.model, "image_root": cfg.image_root,
                               "max_tokens": cfg.max_tokens, "threads": int(cfg.cpus_per_replica),
                               "device": "cuda" if cfg.use_gpu else "cpu"})
    by_index = {r["index"]: r for r in ds.take_all()}
    return [{**ex, "prediction": by_index[ex["index"]]["prediction"],
             "error": by_index[ex["index"]]["error"]} for ex in examples]


def derangement(images: list[str], seed: int = SHUFFLE_SEED) -> dict[str, str]:
    """Each distinct image -> another one (Sattolo's shuffle: a single cycle, so none maps to
    itself); every question about an image is then asked about a different picture."""
    distinct, rng = sorted(set(images)), np.random.default_rng(seed)
    order = list(range(len(distinct)))
    for i in range(len(order) - 1, 0, -1):  # Sattolo: swap with a strictly earlier position
        j = int(rng.integers(0, i))
        order[i], order[j] = order[j], order[i]
    return {distinct[k]: distinct[order[k]] for k in range(len(distinct))}


def with_controls(examples: list[dict]) -> list[dict]:
    """The examples with their images, then again with a blank image, then with another
    record's image (skipped when the set has a single image); indices made unique."""
    out = [{**ex, "condition": "image"} for ex in examples]
    swap = derangement([ex["image"] for ex in examples])
    for cond in CONTROLS:
        if cond == "shuffled" and len(swap) < 2:
            continue
        out += [{**ex, "condition": cond, "image": swap[ex["image"]] if cond == "shuffled" else ex["image"]}
                for ex in examples]
    return [{**ex, "index": i} for i, ex in enumerate(out)]


def control_tests(rows: list[dict]) -> dict[str, dict]:
    """Condition -> the paired tests of each control against the real images, per group."""
    image = [r for r in rows if r["condition"] == "image"]
    return {c: paired_by_group(image, cond) for c in CONTROLS
            if (cond := [r for r in rows if r["condition"] == c])}


def check_leakage(cfg: EvalConfig, examples: list[dict]) -> tuple[dict, list[dict]]:
    """The eval images found in the training corpus (exact pixels or near duplicates), by
    question id (``checked: False`` without training records), and the examples to score:
    all, or with ``leakage_drop`` those whose image was not found."""
    if not cfg.leakage_data:
        return {"checked": False, "overlaps": []}, examples
    overlaps = find_overlaps(sorted({ex["image"] for ex in examples}), cfg.image_root, cfg.leakage_data,
                             cfg.leakage_image_root or cfg.image_root)
    hit = {o["eval_image"] for o in overlaps}
    kept = [ex for ex in examples if ex["image"] not in hit] if cfg.leakage_drop else examples
    if not kept:
        raise ValueError("eval: every eval image was found in the training corpus (leakage_drop)")
    leakage = {"checked": True, "corpus": cfg.leakage_data, "phash_bits": PHASH_BITS, "overlaps": overlaps,
               "dropped": cfg.leakage_drop, "questions": [ex["id"] for ex in examples if ex["image"] in hit]}
    return leakage, [{**ex, "index": i} for i, ex in enumerate(kept)]


def setup(cfg: EvalConfig) -> dict:
    """What a published number must match: regime, prompt template and decoding."""
    meta = read_meta(cfg.model, image_size=0)
    return {"regime": cfg.regime, "template": meta["template"], "aspect": meta["aspect"],
            "decoding": f"greedy, at most {cfg.max_tokens} new tokens, batches of {cfg.batch_size}"}


def evaluate(cfg: EvalConfig, placement: Placement | None = None) -> dict:
    """Run the eval set through the model; write the report; return ``metrics.json``'s content."""
    for name in ("model", "data", "image_root", "output"):
        if not getattr(cfg, name):
            raise ValueError(f"eval: --{name.replace('_', '-')} is required")
    cfg = dataclasses.replace(cfg, **{k: storage.absolute(getattr(cfg, k))
                                      for k in ("model", "data", "image_root", "output", "leakage_data",
                                                "leakage_image_root")})
    check_inputs({"model": storage.join(cfg.model, "config.json"), "data": cfg.data, "image_root": cfg.image_root,
                  "leakage_data": cfg.leakage_data},
                 outputs=(cfg.output,))  # a missing training corpus: said before Ray starts, not in a task
    examples = load_eval_records(cfg.data, cfg.limit)
    if not examples:
        raise ValueError(f"eval: {cfg.data} holds no records")
    provenance = {**split_hash(examples, cfg.image_root), "imported": read_imported(cfg.data)}
    init_ray()
    placement = placement or Placement()
    if cfg.use_gpu:
        check_accelerator(placement.serve_accelerator)
    leakage, examples = check_leakage(cfg, examples)
    asked = with_controls(examples) if cfg.controls else [{**ex, "condition": "image"} for ex in examples]
    rows = predict(cfg, asked, placement)
    for row in rows:
        row["scores"] = score(row["prediction"], row)
    image = [r for r in rows if r["condition"] == "image"]
    extra = {"llava_med": llava_med.scores(image)} if cfg.protocol == "llava-med" else {}
    meta = {"model": cfg.model, "data": cfg.data, **extra, "setup": setup(cfg), "provenance": provenance,
            "leakage": leakage, "bilingual": agreement(image)}
    return write_report(rows, cfg.output, meta, control_tests(rows))
