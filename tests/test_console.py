"""The driver's console: training lines from rank 0's metrics.jsonl, ETA, restarts."""

import json

from medvl.console import MetricsFollower, step_line


def rec(step: int, **kw) -> dict:
    return {"step": step, "loss": 1.0 / step, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1000.0,
            "padding": 0.1, "data_wait": 0.02, "step_s": 2.0, **kw}


def test_step_line_has_progress_loss_grad_norm_and_eta():
    line = step_line(2, rec(10), total=100, seconds_per_step=2.0)
    assert line.startswith("[stage 2] step 10/100 loss 0.1000 lr 1.00e-03 gnorm 0.500 1000 tok/s")
    assert line.endswith("eta 3:00")  # 90 steps x 2 s


def test_follower_prints_each_new_window_once_and_says_when_a_run_restarted(tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    follower = MetricsFollower(str(metrics), stage=1, total=30)
    follower.poll()  # no file yet: nothing
    metrics.write_text("".join(json.dumps(rec(s)) + "\n" for s in range(1, 11)))
    follower.poll()
    follower.poll()  # nothing new: no second line
    metrics.write_text("".join(json.dumps(rec(s)) + "\n" for s in range(1, 6)))  # restored at step 5
    follower.poll()
    out = capsys.readouterr().out.splitlines()
    assert [x.split(" loss")[0] for x in out] == ["[stage 1] step 10/30",
                                                  "[stage 1] restarted from checkpoint at step 5"]


def test_every_validation_gets_a_line_even_between_two_polls(tmp_path, capsys):
    """Validation steps need not fall on a log window: each one is printed with its val_loss."""
    metrics = tmp_path / "metrics.jsonl"
    follower = MetricsFollower(str(metrics), stage=2, total=30)
    metrics.write_text("".join(json.dumps(rec(s, **({"val_loss": 0.25} if s in (3, 6) else {}))) + "\n"
                               for s in range(1, 11)))
    follower.poll()
    out = capsys.readouterr().out.splitlines()
    assert [x.split(" lr")[0] for x in out] == ["[stage 2] step 3/30 loss 0.3333 val_loss 0.2500",
                                                "[stage 2] step 6/30 loss 0.1667 val_loss 0.2500",
                                                "[stage 2] step 10/30 loss 0.1000"]
