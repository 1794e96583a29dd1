"""LLaVA-Med's run_eval.py scoring, against cases worked out by hand from that script."""

import pytest

from medvl.eval import llava_med as lm


@pytest.mark.parametrize(("text", "norm"), [
    ("The lesion, is 3.5 cm.", "lesion is 3.5 cm"),       # ", " dropped, final period dropped, 3.5 kept
    ("two nodules (left-side)", "2 nodules left side"),   # " (" dropped; ")" and "-" become spaces
    ("An MRI", "mri"),
    ("1,000 cells", "1000 cells"),                        # a digit comma: punctuation dropped, not spaced
])
def test_normalize(text, norm):
    assert lm.normalize(text) == norm


@pytest.mark.parametrize(("pred", "answer", "hit"), [
    ("No, there is not.", "no", 1),
    ("Yes", "no", None),        # wrong, but contains "yes": left out of the average
    ("I know", "yes", None),    # "know" contains "no"
    ("肺", "是", 0),             # neither yes nor no: scored 0
])
def test_closed_hit(pred, answer, hit):
    assert lm.closed_hit(pred, answer) == hit


def test_recall_counts_prediction_repeats():
    assert lm.recall("left left lobe", "left lobe") == 1.0
    assert lm.recall("lobe", "the left lobe") == 0.5
    assert lm.recall("胸部X线图像", "胸部X线") == 0.0  # one whitespace token each


def test_scores_leave_out_what_the_script_leaves_out():
    rows = [{"answer_type": "closed", "prediction": "yes", "answer": "yes"},
            {"answer_type": "closed", "prediction": "yes", "answer": "no"},
            {"answer_type": "closed", "prediction": "肺", "answer": "是"},
            {"answer_type": "open", "prediction": "left lower lobe", "answer": "left lobe"},
            {"answer_type": "open", "prediction": "胸部X线图像", "answer": "胸部X线"}]
    assert lm.scores(rows) == {"closed_accuracy": 0.5, "closed_counted": 2, "closed_total": 3,
                               "open_recall": 0.5}
