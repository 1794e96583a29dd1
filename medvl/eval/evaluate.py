"""``medvl eval``: batch inference over an eval set with Ray Data, then metrics and a report.

Records -> Ray Data -> an actor pool of ``Predictor`` s (the model loaded once per actor,
the pool sized by the recipe) generating greedily in batches -> metrics per example ->
``OUTPUT/{predictions.jsonl, metrics.json, report.md, metrics.png}``. Greedy decoding with
a fixed batch composition and order makes two runs give identical results.
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
from medvl.eval import llava_med
from medvl.eval.metrics import answer_type, score
from medvl.eval.report import write_report
from medvl.placement import Placement, actor_options, check_accelerator
from medvl.preflight import check_inputs
from medvl.serving.engine import Engine, Request


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
              "modality": raw.get("modality") or "unknown", "task": raw.get("task") or "vqa"}
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
                ready.append((i, self.engine.prepare(req)))
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


def evaluate(cfg: EvalConfig, placement: Placement | None = None) -> dict:
    """Run the eval set through the model; write the report; return ``metrics.json``'s content."""
    for name in ("model", "data", "image_root", "output"):
        if not getattr(cfg, name):
            raise ValueError(f"eval: --{name.replace('_', '-')} is required")
    cfg = dataclasses.replace(cfg, **{k: storage.absolute(getattr(cfg, k))
                                      for k in ("model", "data", "image_root", "output")})
    check_inputs({"model": storage.join(cfg.model, "config.json"), "data": cfg.data, "image_root": cfg.image_root},
                 outputs=(cfg.output,))
    examples = load_eval_records(cfg.data, cfg.limit)
    if not examples:
        raise ValueError(f"eval: {cfg.data} holds no records")
    init_ray()
    placement = placement or Placement()
    if cfg.use_gpu:
        check_accelerator(placement.serve_accelerator)
    rows = predict(cfg, examples, placement)
    for row in rows:
        row["scores"] = score(row["prediction"], row)
    extra = {"llava_med": llava_med.scores(rows)} if cfg.protocol == "llava-med" else {}
    return write_report(rows, cfg.output, {"model": cfg.model, "data": cfg.data, **extra})
