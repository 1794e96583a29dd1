"""Each metric against values computed by hand."""

import math

import pytest

from medvl.data.demo import CHOICES
from medvl.eval import metrics as m


@pytest.mark.parametrize(("text", "canon"), [
    ("  Yes.", "yes"), ("是的。", "yes"), ("否", "no"), ("No", "no"), ("不是", "no"),
    ("ＣＴ", "ct"), ("磁共振 ", "磁共振"),
])
def test_canonical_folds_yes_no_and_width(text, canon):
    assert m.canonical(text) == canon


@pytest.mark.parametrize(("pred", "answer", "choices", "ok"), [
    ("是，这是CT图像", "是", ["是", "否"], True),      # leading yes
    ("否", "是", ["是", "否"], False),
    ("不是磁共振", "否", ["是", "否"], True),          # leading "不" is no, not the 是 inside
    ("这是一张磁共振图像", "磁共振", CHOICES, True),    # names exactly one choice
    ("CT或X线", "CT", CHOICES, False),                 # names two: no choice, wrong
    ("Yes, there is", "yes", None, True),              # yes/no without listed choices
    ("normal", "no", None, False),                     # "n..." is not "no"
    ("left lobe", "left", None, True),                 # closed non-yes/no: contains the answer
    ("不包含", "包含", None, False),                     # SLAKE zh: 包含 is its yes, not a word inside 不包含
    ("不包括", "不包含", None, True),
])
def test_closed_accuracy(pred, answer, choices, ok):
    assert m.closed_correct(pred, answer, choices) is ok


def test_open_recall_exact_match_and_f1():
    # answer tokens: 这 是 胸 部 x 线 图 像 (8); found in the prediction: 胸 部 x 线 (4)
    assert m.recall("胸部X线", "这是胸部X线图像") == 0.5
    assert m.exact_match("Yes.", "yes") == 1.0 and m.exact_match("胸部", "胸部X线") == 0.0
    # pred 胸 部 x 线 图 像 (6), ref 胸 部 ct 图 像 (5), 4 shared: P 4/6, R 4/5 -> F1 16/22
    assert m.token_f1("胸部X线图像", "胸部CT图像") == pytest.approx(16 / 22)
    assert m.token_f1("肝脏", "胸部") == 0.0


def test_bleu4_character_level():
    # 1-4 gram precisions 4/5, 3/4, 2/3, 1/2, same length (no brevity penalty)
    assert m.bleu4("甲乙丙丁己", "甲乙丙丁戊") == pytest.approx(0.2 ** 0.25, abs=1e-4)
    assert m.bleu4("胸部X线图像", "胸部X线图像") == pytest.approx(1.0)


def test_rouge_l_character_level():
    # LCS(甲乙丙丁戊, 甲丙戊己) = 甲丙戊: P 3/4, R 3/5, F 2PR/(P+R) = 2/3
    assert m.rouge_l("甲丙戊己", "甲乙丙丁戊") == pytest.approx(2 / 3)


def test_score_picks_metrics_by_answer_type():
    closed = m.score("是", {"answer": "是", "answer_type": "closed", "choices": ["是", "否"]})
    assert closed == {"exact_match": 1.0, "token_f1": 1.0, "closed_accuracy": 1.0}
    opened = m.score("胸部X线", {"answer": "这是胸部X线图像", "answer_type": "open"})
    assert set(opened) == {"exact_match", "token_f1", "open_recall", "bleu4", "rouge_l"}
    assert math.isclose(opened["open_recall"], 0.5)
    assert m.answer_type({"answer": "Yes"}) == "closed" and m.answer_type({"answer": "肺"}) == "open"


def test_aggregate_and_chance_against_hand_computed_values():
    from medvl.eval.report import GROUPS, aggregate
    from medvl.eval.stats import wilson

    def row(kind, modality, scores, choices=None, error=""):
        return {"answer_type": kind, "modality": modality, "scores": scores, "choices": choices, "error": error}

    rows = [
        row("closed", "CT", {"closed_accuracy": 1.0, "exact_match": 1.0, "token_f1": 1.0}, ["是", "否"]),
        row("closed", "MR", {"closed_accuracy": 0.0, "exact_match": 0.0, "token_f1": 0.5}, list(CHOICES)),
        row("closed", "MR", {"closed_accuracy": 1.0, "exact_match": 0.0, "token_f1": 0.25}),  # yes/no, unlisted
        row("open", "CT", {"exact_match": 0.0, "token_f1": 0.5, "open_recall": 0.25, "bleu4": 0.1,
                           "rouge_l": 0.3}, error="no-such-image.png"),
    ]
    m = aggregate(rows)
    assert m["overall"].pop("closed_accuracy_ci") == pytest.approx(list(wilson(2, 3)))
    assert m["by_answer_type"]["closed"].pop("exact_match_ci") == pytest.approx(list(wilson(1, 3)))
    for s in [m["overall"], *(g for key in GROUPS for g in m[f"by_{key}"].values())]:
        for k in [k for k in s if k.endswith("_ci")]:  # every metric has its interval, around it
            assert s[k][0] <= s[k.removesuffix("_ci")] + 1e-9 and s[k.removesuffix("_ci")] <= s[k][1] + 1e-9
            del s[k]
    assert (m["n"], m["errors"]) == (4, 1)
    assert m["closed_chance"] == pytest.approx((1 / 2 + 1 / len(CHOICES) + 1 / 2) / 3)
    assert m["overall"] == pytest.approx({"n": 4, "closed_accuracy": 2 / 3, "exact_match": 1 / 4,
                                          "token_f1": 2.25 / 4, "open_recall": 0.25, "bleu4": 0.1,
                                          "rouge_l": 0.3, "closed_chance": m["closed_chance"]})
    assert m["by_answer_type"]["closed"] == pytest.approx({"n": 3, "closed_accuracy": 2 / 3,
                                                           "exact_match": 1 / 3, "token_f1": 1.75 / 3,
                                                           "closed_chance": m["closed_chance"]})
    assert m["by_modality"]["MR"] == pytest.approx({"n": 2, "closed_accuracy": 0.5, "exact_match": 0.0,
                                                    "token_f1": 0.375, "closed_chance": (1 / len(CHOICES) + 0.5) / 2})
    assert m["by_task"] == {None: pytest.approx(m["overall"])}  # rows without a task: one group
    assert m["by_modality"]["CT"]["token_f1"] == pytest.approx(0.75)
