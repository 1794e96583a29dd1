"""The run summary: the stage table's validation columns, and the chat page's address as the
last line (issue #33: `make demo` ends with it)."""

from medvl.summary import summary_markdown

EMPTY = {"run": "runs/demo", "recipe": "demo.yaml", "steps": {}, "data": {}, "stages": {}, "eval": None,
         "sample": None, "plots": []}


def test_summary_ends_with_the_web_page_and_says_when_it_stopped():
    live = summary_markdown({**EMPTY, "page": "http://10.0.0.5:8000/", "serving": True})
    assert live.rstrip().splitlines()[-1] == "Web page: http://10.0.0.5:8000/"
    stopped = summary_markdown({**EMPTY, "page": "http://127.0.0.1:8000/", "serving": False})
    assert stopped.rstrip().splitlines()[-1].startswith("Web page: http://127.0.0.1:8000/ (stopped with this run")


def test_a_summary_from_before_the_page_has_no_page_line():
    assert "Web page" not in summary_markdown(EMPTY)  # a deploy marker written before issue #33


def test_stage_table_has_last_and_best_val_loss_or_dashes():
    stages = {"stage1": {"steps": 30, "first_loss": 5.0, "last_loss": 2.0, "last_val_loss": None},
              "stage2": {"steps": 50, "first_loss": 4.0, "last_loss": 1.5, "last_val_loss": 1.9,
                         "best_val_loss": 1.8, "best_val_step": 40}}
    md = summary_markdown({**EMPTY, "run": "r", "recipe": "x.yaml", "stages": stages})
    assert "| stage1 | 30 | 5.000 | 2.000 | - | - |" in md
    assert "| stage2 | 50 | 4.000 | 1.500 | 1.900 | 1.800 (40) |" in md
