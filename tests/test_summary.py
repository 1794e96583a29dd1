"""The run summary's last line is the chat page's address (issue #33): `make demo` ends with it."""

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
