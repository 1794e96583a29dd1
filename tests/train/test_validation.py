"""Validation loss on held-out rows: split at preprocessing by a hash of the record's image, never
in any rank's training batches, and equal to plain transformers' loss on those rows.

Stage 2 from the random tiny preset, ZeRO-3 with gradient checkpointing (the hardest path: every
rank must join every forward's parameter gathers), 2 micro-batch-2 ranks on an odd val set
(so one rank pads its passes with an unlabelled batch), LoRA with dropout (so a validation
that left the model in eval mode or moved the RNG would change the training losses).
"""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from medvl import storage
from medvl.data.holdout import held_out, holdout_key
from medvl.data.preprocess import PreprocessConfig, preprocess
from medvl.train.batching import collate, model_inputs
from medvl.train.config import TrainConfig
from medvl.train.feed import plan_rows
from medvl.train.trainer import feed_plan, read_manifest, train

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]

VAL_FRACTION = 0.1


@pytest.fixture(scope="module")
def val_data(demo_dir, tmp_path_factory) -> str:
    """The demo's instruction corpus with ``VAL_FRACTION`` of its records held out."""
    out = str(tmp_path_factory.mktemp("valdata"))
    preprocess(PreprocessConfig(data=str(demo_dir / "instruction_train.jsonl"), output=out, template="v1",
                                image_root=str(demo_dir / "images"), tokenizer=str(demo_dir / "tokenizer"),
                                image_size=32, num_image_tokens=16, max_length=256, val_fraction=VAL_FRACTION))
    return out


def val_cfg(data: str, demo_dir, output: str, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(stage=2, data=data, output=output, name="val", tokenizer=str(demo_dir / "tokenizer"),
                                 batch_size=2, zero_stage=3, gradient_checkpointing=True, lora_r=4, lora_dropout=0.3,
                                 max_steps=6, checkpoint_every=3, log_every=100), **kw})


@pytest.fixture(scope="module")
def validated(val_data, demo_dir, tmp_path_factory) -> tuple[TrainConfig, dict]:
    """Validation at each checkpoint (the default): steps 3 and 6."""
    cfg = val_cfg(val_data, demo_dir, str(tmp_path_factory.mktemp("valrun")))
    return cfg, train(cfg)


def _metrics(output: str) -> list[dict]:
    return [json.loads(x) for x in storage.read_text(storage.join(output, "metrics.jsonl")).splitlines()]


def _ids(data: str, shards: list[str]) -> list[str]:
    return [i for s in shards for i in pq.read_table(storage.join(data, s), columns=["id"])["id"].to_pylist()]


def _rows(data: str, shards: list[str]) -> dict:
    tables = [pq.read_table(storage.join(data, s)) for s in shards]
    return {c: [x for t in tables for x in t[c].to_pylist()] for c in tables[0].column_names}


def test_held_out_rows_are_never_in_a_training_batch(validated, val_data, demo_dir):
    """The val shards hold exactly the records the image hash picks; no rank's planned batches
    (which the loop checks row by row against what it reads) hold one of them."""
    cfg, _ = validated
    manifest = read_manifest(val_data)
    val_ids = _ids(val_data, manifest["val_shards"])
    with open(demo_dir / "instruction_train.jsonl") as f:
        picked = {r["id"] for r in map(json.loads, f) if held_out(holdout_key(r["image"], r["id"]), VAL_FRACTION)}
    assert len(val_ids) == manifest["records_val"] == sum(manifest["val_shard_rows"]) >= 5
    assert set(val_ids) == picked and len(val_ids) % 2 == 1  # odd: one rank pads its passes
    train_ids = np.array(_ids(val_data, manifest["shards"]))
    lengths = np.concatenate([pq.read_table(storage.join(val_data, s), columns=["length"])["length"].to_numpy()
                              for s in manifest["shards"]])
    plan = feed_plan(cfg, manifest)
    trained = {i for rank in range(cfg.num_workers) for i in train_ids[plan_rows(plan, rank, lengths)]}
    assert trained and not trained & set(val_ids)
    assert len(train_ids) + len(val_ids) == manifest["records_kept"]


def test_val_loss_is_the_token_weighted_loss_on_the_held_out_rows(validated, val_data):
    """At every checkpoint and the end: ``val_loss`` in metrics.jsonl, TensorBoard, the
    summary; the last one equals plain transformers' loss (labels) on every held-out row
    with the exported model, token-weighted, to 1e-4."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import LlavaForConditionalGeneration

    cfg, summary = validated
    val = {r["step"]: r["val_loss"] for r in _metrics(cfg.output) if "val_loss" in r}
    assert list(val) == [3, 6]
    assert summary["last_val_loss"] == val[6] and summary["best_val_loss"] == min(val.values())
    events = EventAccumulator(os.path.join(cfg.output, "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("val/loss")] == [(s, pytest.approx(v)) for s, v in val.items()]

    model = LlavaForConditionalGeneration.from_pretrained(summary["hf"], dtype=torch.float32).eval()
    rows = _rows(val_data, read_manifest(val_data)["val_shards"])
    batch = model_inputs(collate(rows, model.config.text_config.pad_token_id or 0, 32), "cpu")
    with torch.no_grad():  # one batch: transformers' mean over all its labelled tokens
        expected = model(**batch).loss.item()
    assert val[6] == pytest.approx(expected, abs=1e-4)


def test_validating_every_step_leaves_the_training_losses_unchanged(validated, val_data, demo_dir, tmp_path):
    """The same stage validated after every step (steps 1, 2, 4, 5 too) trains exactly as
    the one validated at steps 3 and 6: modes (LoRA dropout) and RNG restored."""
    cfg, _ = validated
    out = str(tmp_path / "every")
    train(val_cfg(val_data, demo_dir, out, val_every=1, checkpoint_every=0))
    every = _metrics(out)
    assert [r["step"] for r in every if "val_loss" in r] == list(range(1, 7))
    assert [r["loss"] for r in every] == pytest.approx([r["loss"] for r in _metrics(cfg.output)], rel=1e-6)
