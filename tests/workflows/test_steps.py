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
    with pytest.raises(ValueError, match="missing.jsonl does not exist"):
        run_pipeline(str(recipe))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == {"preprocess-alignment": {"status": "failed", "hash": None}}
    assert not (tmp_path / "run" / "data" / "alignment" / "_SUCCESS").exists()


@pytest.mark.slow
def test_step_flags_rerun_rules_and_a_later_failure_on_s3(ray_cluster, demo_dir, s3_endpoint, tmp_path):
    """``--until/--only/--force/--from`` through ``run_pipeline`` with the run on S3: what runs,
    what is skipped, a changed config empties its step's directory, and a later step's
    failure leaves the completed steps' markers as they were."""
    import json
    import uuid

    import yaml

    from medvl import storage
    from medvl.pipeline import read_marker, run_pipeline

    def section(kind: str, template: str) -> dict:
        return {"data": str(demo_dir / f"{kind}_train.jsonl"), "image_root": str(demo_dir / "images"),
                "output": f"${{run}}/data/{kind}", "tokenizer": str(demo_dir / "tokenizer"),
                "template": template, "image_size": 32, "num_image_tokens": 16, "max_length": 256}

    doc = {"preprocess_alignment": section("alignment", "plain"),
           "preprocess_instruction": section("instruction", "v1"),
           "stage1": {"data": "${run}/data/not-there", "output": "${run}/stage1"}}  # fails at once
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    run = f"{s3_endpoint}/pipe-{uuid.uuid4().hex[:8]}"

    def go(**flags) -> dict[str, str]:
        summary = run_pipeline(str(recipe), output=run, **flags)
        assert json.loads(storage.read_text(f"{run}/summary.json"))["steps"] == summary["steps"]
        return {k: v["status"] for k, v in summary["steps"].items()}

    first = go(until="preprocess-instruction")
    assert first == {"preprocess-alignment": "ran", "preprocess-instruction": "ran", "stage1": "not run",
                     "stage2": "not run", "evaluate": "not run", "export": "not run", "deploy": "not run"}
    align, instr = read_marker(f"{run}/data/alignment"), read_marker(f"{run}/data/instruction")
    assert go(only="preprocess-instruction")["preprocess-instruction"] == "skipped"
    forced = go(only="preprocess-instruction", force=True)
    assert forced["preprocess-instruction"] == "ran" and forced["preprocess-alignment"] == "complete"
    assert read_marker(f"{run}/data/instruction")["finished_at"] > instr["finished_at"]
    assert read_marker(f"{run}/data/alignment") == align  # not selected: untouched

    # A changed config: an error naming the field; --resume keeps the saved run; only
    # --overwrite empties the step's directory and runs it again.
    storage.write_text(f"{run}/data/alignment/stale.txt", "from the old config")
    doc["preprocess_alignment"]["max_length"] = 200
    recipe.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match=r"max_length: 256 -> 200.*--resume.*--overwrite"):
        go(only="preprocess-alignment")
    assert go(only="preprocess-alignment", resume=True)["preprocess-alignment"] == "kept"
    assert storage.exists(f"{run}/data/alignment/stale.txt") and read_marker(f"{run}/data/alignment") == align
    assert go(only="preprocess-alignment", overwrite=True)["preprocess-alignment"] == "ran"
    assert not storage.exists(f"{run}/data/alignment/stale.txt")
    assert read_marker(f"{run}/data/alignment")["hash"] != align["hash"]

    # A later step fails: the run fails, the summary says where, earlier markers stand.
    before = read_marker(f"{run}/data/instruction")
    with pytest.raises(ValueError, match="not-there/manifest.json does not exist"):
        go(until="stage1")
    summary = json.loads(storage.read_text(f"{run}/summary.json"))["steps"]
    assert {k: v["status"] for k, v in summary.items() if k != "stage1"} == {
        "preprocess-alignment": "skipped", "preprocess-instruction": "skipped"}
    assert summary["stage1"]["status"] == "failed"
    assert read_marker(f"{run}/data/instruction") == before and not read_marker(f"{run}/stage1")


def test_rerun_rules_name_the_fields_and_delete_only_with_overwrite(ray_cluster, tmp_path):
    """The demo-data step alone (no Ray work): a changed field stops the run with one line
    naming it, and nothing is deleted without --overwrite. The resolved config is saved
    beside the step's output."""
    import yaml

    from medvl.pipeline import read_marker, run_pipeline

    recipe = tmp_path / "r.yaml"
    doc = {"run": str(tmp_path / "run"), "demo_data": {"output": "${run}/demo-data", "variants": 1}}
    recipe.write_text(yaml.safe_dump(doc))
    run_pipeline(str(recipe), only="demo-data")
    out = tmp_path / "run" / "demo-data"
    assert yaml.safe_load((out / "config.yaml").read_text())["variants"] == 1
    first = read_marker(str(out))
    (out / "mine.txt").write_text("a user's file")
    doc["demo_data"]["variants"] = 2
    recipe.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError) as e:
        run_pipeline(str(recipe), only="demo-data")
    assert "variants: 1 -> 2" in str(e.value) and "\n" not in str(e.value)
    assert (out / "mine.txt").exists() and read_marker(str(out)) == first
    run_pipeline(str(recipe), only="demo-data", overwrite=True)
    assert not (out / "mine.txt").exists() and read_marker(str(out))["hash"] != first["hash"]
