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
