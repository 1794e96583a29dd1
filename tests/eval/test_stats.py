"""Intervals, paired tests, controls' bookkeeping and provenance, against hand-computed values."""

import pytest

from medvl.cli import main
from medvl.eval.compare import compare_runs
from medvl.eval.evaluate import derangement, with_controls
from medvl.eval.provenance import split_hash
from medvl.eval.report import write_report
from medvl.eval.stats import binom_two_sided, bootstrap_ci, mcnemar, paired_bootstrap, wilson


def test_wilson_matches_hand_computed_interval():
    # 8/10: centre (0.8 + z²/20) / (1 + z²/10), half z/(1 + z²/10) * sqrt(0.016 + z²/400), z = 1.96
    assert wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=2e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=2e-4)  # honest at 0/n, unlike p ± z·se
    assert wilson(10, 10)[1] == pytest.approx(1.0) and wilson(0, 0) == (0.0, 1.0)


def test_exact_mcnemar_on_the_discordant_pairs():
    assert binom_two_sided(1, 10) == pytest.approx(2 * (1 + 10) / 1024)  # 0.0215
    assert binom_two_sided(5, 10) == 1.0 and binom_two_sided(0, 0) == 1.0
    # 20 questions: both right on 8, only A right on 1, only B right on 9, both wrong on 2
    a = [True] * 8 + [True] + [False] * 9 + [False] * 2
    b = [True] * 8 + [False] + [True] * 9 + [False] * 2
    t = mcnemar(a, b)
    assert (t["only_a_right"], t["only_b_right"], t["n"]) == (1, 9, 20)
    assert t["p"] == pytest.approx(22 / 1024) and t["diff"] == pytest.approx((9 - 1) / 20)
    assert t["ci"][0] > 0  # B is better and the interval says so


def test_bootstraps_against_known_values():
    assert bootstrap_ci([0.3] * 50) == (pytest.approx(0.3), pytest.approx(0.3))
    lo, hi = bootstrap_ci([0.0, 1.0] * 200)  # mean 0.5, se sqrt(.25/400) = .025: 0.5 ± 0.049
    assert lo == pytest.approx(0.451, abs=0.01) and hi == pytest.approx(0.549, abs=0.01)
    shifted = paired_bootstrap([0.1, 0.5, 0.2, 0.7] * 10, [0.3, 0.7, 0.4, 0.9] * 10)
    assert shifted["diff"] == pytest.approx(0.2) and shifted["ci"] == pytest.approx([0.2, 0.2]) and shifted["p"] == 0
    noise = paired_bootstrap([0.0, 1.0] * 20, [1.0, 0.0] * 20)
    assert noise["diff"] == 0 and noise["p"] > 0.5


def test_shuffled_images_are_a_derangement_of_distinct_images():
    images = ["a.png", "b.png", "b.png", "c.png", "d.png"]
    swap = derangement(images)
    assert sorted(swap.values()) == sorted(set(images)) and all(k != v for k, v in swap.items())
    assert swap == derangement(images)  # fixed seed
    asked = with_controls([{"id": str(i), "image": im, "index": i} for i, im in enumerate(images)])
    assert [r["condition"] for r in asked] == ["image"] * 5 + ["blank"] * 5 + ["shuffled"] * 5
    assert [r["index"] for r in asked] == list(range(15))
    assert all(r["image"] != o["image"] for r, o in zip(asked[10:], asked[:5], strict=True))


def rows(condition: str, right: list[bool], task: str = "finding") -> list[dict]:
    return [{"index": i, "id": f"q{i}", "image": f"{i}.png", "question": "结节?", "answer": "是", "choices": None,
             "task": task, "modality": "CT", "answer_type": "closed", "condition": condition,
             "prediction": "是" if ok else "否", "error": "",
             "scores": {"closed_accuracy": float(ok), "exact_match": float(ok), "token_f1": float(ok)}}
            for i, ok in enumerate(right)]


def report(tmp_path, blank_right: list[bool]) -> dict:
    from medvl.eval.evaluate import control_tests

    image = rows("image", [True] * 30)
    everything = image + rows("blank", blank_right)
    return write_report(everything, str(tmp_path), {"model": "m", "data": "d"}, control_tests(everything))


def test_a_control_above_chance_is_called_out(tmp_path):
    looking = report(tmp_path / "a", [i % 2 == 0 for i in range(30)])
    assert looking["controls"]["blank"]["groups"]["task: finding"]["closed_accuracy"] == 0.5
    assert looking["control_notes"] == [] and "the answers depend on the image" in (tmp_path / "a" / "report.md").read_text()
    test = looking["controls"]["blank"]["tests"]["task: finding"]["closed_accuracy"]
    assert (test["only_a_right"], test["only_b_right"]) == (15, 0) and test["p"] == pytest.approx(2 / 2**15)
    blind = report(tmp_path / "b", [True] * 29 + [False])
    assert any("task: finding" in n and "not looking" in n for n in blind["control_notes"])
    assert "the model is not looking" in (tmp_path / "b" / "report.md").read_text()
    assert blind["overall"]["closed_accuracy_ci"] == pytest.approx(list(wilson(30, 30)))


def test_eval_compare_pairs_two_runs(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    write_report(rows("image", [True] * 8 + [True] + [False] * 11), str(a), {"model": "a", "data": "d"})
    write_report(rows("image", [True] * 8 + [False] + [True] * 9 + [False] * 2), str(b), {"model": "b", "data": "d"})
    t = compare_runs(str(a), str(b))["overall"]["closed_accuracy"]
    assert (t["only_a_right"], t["only_b_right"], t["p"]) == (1, 9, pytest.approx(22 / 1024))
    main(["eval", "compare", str(a), str(b)])
    out = capsys.readouterr().out
    assert "| overall | closed_accuracy | 20 | 0.450 | 0.850 | +0.400" in out and "B better" in out
    other = tmp_path / "c"
    write_report(rows("image", [True] * 5), str(other), {"model": "c", "data": "d"})
    with pytest.raises(SystemExit) as e:
        main(["eval", "compare", str(a), str(other)])
    assert e.value.code == 2 and "same questions" in capsys.readouterr().err


def test_split_hash_covers_questions_and_image_bytes(tmp_path):
    (tmp_path / "x.png").write_bytes(b"one")
    (tmp_path / "y.png").write_bytes(b"two")
    exs = [{"id": "1", "question": "q", "answer": "a", "image": "x.png"},
           {"id": "2", "question": "q", "answer": "b", "image": "y.png"}]
    h = split_hash(exs, str(tmp_path))
    assert (h["questions"], h["images"], h["missing_images"]) == (2, 2, 0)
    assert split_hash(exs[::-1], str(tmp_path))["sha256"] == h["sha256"]  # order does not matter
    (tmp_path / "y.png").write_bytes(b"twp")
    assert split_hash(exs, str(tmp_path))["sha256"] != h["sha256"]  # one changed byte does
    assert split_hash([{**exs[0], "answer": "c"}, exs[1]], str(tmp_path))["sha256"] != h["sha256"]
    assert split_hash([{**exs[0], "image": "gone.png"}], str(tmp_path))["missing_images"] == 1


def test_run_summary_carries_the_control_notes(tmp_path, capsys):
    """summary.py takes the run and output paths (not pipeline's Recipe) and repeats the
    report's sentences about the controls."""
    from medvl.eval.evaluate import control_tests
    from medvl.summary import write_summary

    everything = rows("image", [True] * 30) + rows("blank", [True] * 30)
    metrics = write_report(everything, str(tmp_path / "eval"), {"model": "m", "data": "d"}, control_tests(everything))
    outputs = {"stage1": str(tmp_path / "s1"), "stage2": str(tmp_path / "s2"), "eval": str(tmp_path / "eval")}
    s = write_summary(str(tmp_path / "run"), outputs, "recipe.yaml", {"evaluate": {"result": metrics}},
                      {"evaluate": {"status": "done"}})
    assert s["plots"] == ["plots/eval_metrics.png"] and (tmp_path / "run" / "plots" / "eval_metrics.png").is_file()
    md = (tmp_path / "run" / "summary.md").read_text()
    assert "- task: finding: with blank (CLIP mean colour) images closed accuracy is 1.000" in md


def open_rows(condition: str, recall: list[float]) -> list[dict]:
    return [{"index": i, "id": f"o{i}", "image": f"{i}.png", "question": "这是什么检查？", "answer": "这是一张胰腺CT图像。",
             "choices": None, "task": "modality", "modality": "CT", "answer_type": "open", "condition": condition,
             "prediction": "这是一张CT图像。", "error": "", "scores": {"open_recall": r, "token_f1": r}}
            for i, r in enumerate(recall)]


def test_open_recall_that_survives_the_controls_is_called_out(tmp_path):
    """Open recall has no chance level: the demo's model answers 「这是一张CT图像。」 to every open
    question under every condition (0.66 recall, measured), and the report must say those
    scores do not depend on the image; a recall that falls without the image is not flagged."""
    from medvl.eval.evaluate import control_tests

    same = open_rows("image", [0.78] * 20) + open_rows("blank", [0.78] * 20)
    m = write_report(same, str(tmp_path / "same"), {"model": "m", "data": "d"}, control_tests(same))
    flagged = [n for n in m["control_notes"] if n.startswith("open recall does not fall")]
    assert len(flagged) == 1 and "task: modality (0.780 → 0.780, p=1)" in flagged[0]
    assert "these open scores do not depend on the image" in (tmp_path / "same" / "report.md").read_text()
    falls = open_rows("image", [0.9] * 20) + open_rows("blank", [0.1] * 20)
    m = write_report(falls, str(tmp_path / "falls"), {"model": "m", "data": "d"}, control_tests(falls))
    assert not any(n.startswith("open recall") for n in m["control_notes"])
