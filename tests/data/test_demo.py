"""The demo corpus: real DICOM sources, split by source so nothing leaks into evaluation."""

import json

from medvl.data.demo import CHOICES, HELD_OUT


def _records(demo_dir, name):
    return [json.loads(x) for x in (demo_dir / f"{name}.jsonl").read_text().splitlines()]


def test_split_by_source_and_every_modality_on_both_sides(demo_dir):
    train, held = _records(demo_dir, "instruction_train"), _records(demo_dir, "instruction_heldout")
    assert {r["source"] for r in held} == HELD_OUT
    assert not {r["source"] for r in train} & HELD_OUT
    assert not {r["image"] for r in train} & {r["image"] for r in held}
    modality = {CHOICES[0], *CHOICES[1:]}
    assert {r["modality"] for r in train} == {r["modality"] for r in held} == modality
    assert any(r["image"].endswith(".dcm") for r in held)  # real DICOM files are evaluated
    for r in train + held:
        assert (demo_dir / "images" / r["image"]).is_file()
        if r["answer_type"] == "closed":
            assert r["conversations"][1]["value"] in r["choices"]


def test_yes_no_questions_are_balanced(demo_dir):
    """Guessing one answer scores half, for the modality and the synthetic-finding questions."""
    for task in ("modality", "finding"):
        answers = [r["conversations"][1]["value"] for r in _records(demo_dir, "instruction_train")
                   if r["choices"] == ["是", "否"] and r["task"] == task]
        assert answers.count("是") > 0 and abs(answers.count("是") - answers.count("否")) <= 1, task


def test_synthetic_findings_are_in_the_held_out_images_and_the_captions(demo_dir):
    held = [r for r in _records(demo_dir, "instruction_heldout") if r["task"] == "finding"]
    assert {r["source"] for r in held} == {"ct_pancreas", "mr_head", "us_echo", "xr_extremity"}
    sides = {r["image"]: r["conversations"][1]["value"] for r in held if r["choices"] == ["上方", "下方"]}
    captions = {r["image"]: r["conversations"][1]["value"] for r in _records(demo_dir, "alignment_heldout")}
    assert sides and all(f"图像{side}可见结节" in captions[img] for img, side in sides.items())
