"""``medvl train --probe``: one worst-case step on the recipe's workers, its peak memory
against capacity, and a stop with one line (exit code 2) when it will not fit."""

from __future__ import annotations

import json

import pytest
import torch

from medvl.cli import main
from medvl.data.tokenize import IGNORE
from medvl.model.build import build_tiny
from medvl.tokenizer import image_token_id
from medvl.train.probe import probe, worst_case_batch
from tests.conftest import stage1_cfg


def test_worst_case_batch_is_full_length_with_an_image_per_row_all_text_labelled(bpe_tokenizer):
    model = build_tiny(bpe_tokenizer)
    n = model.config.image_seq_length
    # 40 rows: ~2,500 random text tokens, so a filler equal to the pad id (3 in the demo
    # tokenizer; the replaced ids were set to 3) shows every time, not one run in two.
    batch = worst_case_batch(model, bpe_tokenizer, rows=40, max_length=64)
    # As long as preprocessing stores a row: max_length counts the image as one token.
    assert batch["input_ids"].shape == (40, 64 - 1 + n) and batch["attention_mask"].all()
    assert ((batch["input_ids"] == image_token_id(bpe_tokenizer)).sum(dim=1) == n).all()
    assert (batch["labels"][:, : 1 + n] == IGNORE).all() and (batch["labels"][:, 1 + n:] != IGNORE).all()
    assert not (batch["input_ids"][:, 1 + n:] == bpe_tokenizer.pad_token_id).any()
    assert batch["pixels"].shape == (40, 32, 32, 3) and batch["pixels"].dtype == torch.uint8


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_probe_of_the_demo_stage1_fits(demo_shards, demo_dir, tmp_path):
    report = probe(stage1_cfg(demo_shards, demo_dir, str(tmp_path / "s1"), "s1"))
    assert report["fits"] and report["batch"] == [4, 256] and len(report["ranks"]) == 2
    for rank in report["ranks"]:
        assert rank["memory"] == "host RSS" and not rank["oom"]
        assert 100 * 2**20 < rank["peak"] < rank["capacity"]  # a real process's peak, under the node's share


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_probe_stops_with_one_line_and_code_2_when_it_will_not_fit(demo_shards, demo_dir, tmp_path, capsys):
    """Stage 2 under ZeRO-3 against a simulated 0.05 GiB device."""
    args = ["train", "--probe", "--probe-capacity-gib", "0.05", "--stage", "2", "--zero-stage", "3",
            "--data", str(demo_shards / "in"), "--output", str(tmp_path / "s2"),
            "--tokenizer", str(demo_dir / "tokenizer"), "--batch-size", "4"]
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert not report["fits"] and report["zero_stage"] == 3
    assert {r["capacity"] for r in report["ranks"]} == {int(0.05 * 2**30)}
    [line] = err.strip().splitlines()
    assert line.startswith("medvl train --probe: stage 2 worst-case batch 4 x 256 (ZeRO-3): peak ")
    assert line.endswith("(does not fit, limit 90%)")
