"""What the user's terminal (or ``ray job logs``, or ``kubectl logs``) shows: a few lines per
step, not every Ray actor's chatter.

The driver starts or joins Ray with worker output kept out of the console (each process
still writes Ray's own log files, and our training workers their ``OUTPUT/logs/rank*.log``);
Ray Data draws progress bars only on a terminal. Training progress reaches the console
from the driver, which follows the ``metrics.jsonl`` that rank 0 appends as it trains, so
the same lines appear whether the job runs locally or under ``ray job submit``.
"""

from __future__ import annotations

import json
import logging
import sys
import threading

from medvl import storage


def init_ray() -> None:
    """``ray.init`` for a driver (local Ray, or the cluster under ``ray job submit``), quiet."""
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    quiet_ray_data()


def quiet_ray_data() -> None:
    """Ray Data in this process: progress bars and per-dataset INFO lines only on a terminal
    (they stay in Ray Data's own log file either way)."""
    import ray.data

    if sys.stderr.isatty():
        return
    ray.data.DataContext.get_current().enable_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
            if _not_bars_disabled not in handler.filters:  # called once per step
                handler.addFilter(_not_bars_disabled)


def _not_bars_disabled(record: logging.LogRecord) -> bool:
    """Ray Data warns, per dataset, that the bars it was told not to draw are off."""
    return not record.getMessage().startswith("Progress bars disabled")


def step_line(stage: int, rec: dict, total: int, seconds_per_step: float) -> str:
    """One training progress line: step/total, loss, lr, grad norm, throughput, ETA."""
    eta = max(0, total - rec["step"]) * seconds_per_step
    norm = f" gnorm {rec['grad_norm']:.3f}" if rec.get("grad_norm") is not None else ""
    val = f" val_loss {rec['val_loss']:.4f}" if rec.get("val_loss") is not None else ""
    return (f"[stage {stage}] step {rec['step']}/{total} loss {rec['loss']:.4f}{val} lr {rec['lr']:.2e}{norm} "
            f"{rec['tokens_per_s']:.0f} tok/s pad {rec['padding']:.1%} wait {rec['data_wait']:.1%} "
            f"eta {_duration(eta)}")


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds + 0.5), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class MetricsFollower:
    """Prints the lines rank 0 appends to ``metrics.jsonl`` while ``fit()`` runs (a thread
    polling every ``interval`` seconds: a small file, also on S3). A step count that goes
    back means the run restarted from a checkpoint, and says so."""

    def __init__(self, uri: str, stage: int, total: int, start_step: int = 0, interval: float = 2.0):
        self.uri, self.stage, self.total, self.interval = uri, stage, total, interval
        self.last_step, self._stop = start_step, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="metrics-follower")

    def __enter__(self) -> MetricsFollower:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()  # the lines written since the last poll

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        try:
            text = storage.read_text(self.uri) if storage.exists(self.uri) else ""
        except OSError:  # being rewritten (S3) or not there yet: the next poll sees it
            return
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        if not records:
            return
        if records[-1]["step"] < self.last_step:  # workers failed and were restored
            print(f"[stage {self.stage}] restarted from checkpoint at step {records[-1]['step']}", flush=True)
        elif records[-1]["step"] > self.last_step:
            recent = [r["step_s"] for r in records[-20:]]
            shown = [r for r in records if self.last_step < r["step"] < records[-1]["step"] and "val_loss" in r]
            for r in [*shown, records[-1]]:  # every validation, even one written between two polls
                print(step_line(self.stage, r, self.total, sum(recent) / len(recent)), flush=True)
        self.last_step = records[-1]["step"]

