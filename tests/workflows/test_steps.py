"""Step selection and the re-run rule, without running any step."""

import pytest

from medvl.pipeline import STEPS, Step, select, step_hash


def test_select_ranges_and_unknown_steps():
    names = list(STEPS)
    assert select(names, None, None, None) == names
    assert select(names, "evaluate", None, None) == ["evaluate"]
    assert select(names, None, "stage2", "export") == ["stage2", "evaluate", "export"]
    with pytest.raises(ValueError, match="unknown step 'stage3'"):
        select(names, None, "stage3", None)


def test_hash_follows_config_inputs_and_upstream_completion(tmp_path):
    records = tmp_path / "r.jsonl"
    records.write_text("{}\n")
    step = Step("stage2", str(tmp_path), {"lr": 1e-3}, dict, deps=("stage1",), inputs=(str(records),))
    markers = {"stage1": {"hash": "a" * 16, "finished_at": 1.0}}
    h = step_hash(step, markers)
    assert h == step_hash(step, markers)
    assert h != step_hash(Step("stage2", str(tmp_path), {"lr": 2e-3}, dict, ("stage1",), (str(records),)), markers)
    assert h != step_hash(step, {"stage1": {"hash": "a" * 16, "finished_at": 2.0}})  # stage 1 re-ran
    records.write_text("{}\n{}\n")  # the raw input changed
    assert h != step_hash(step, markers)


def test_a_failing_step_is_in_the_summary_and_fails_the_run(ray_cluster, tmp_path):
    import json

    from medvl.pipeline import run_pipeline

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"run: {tmp_path / 'run'}\n"
                      "preprocess_alignment:\n  data: ${run}/missing.jsonl\n  image_root: ${run}\n"
                      "  output: ${run}/data/alignment\n  tokenizer: ${run}/tok\n")
    with pytest.raises(FileNotFoundError):
        run_pipeline(str(recipe))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == {"preprocess-alignment": {"status": "failed", "hash": None}}
    assert not (tmp_path / "run" / "data" / "alignment" / "_SUCCESS").exists()
