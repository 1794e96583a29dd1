"""Experiment tracking from inside the training workers, as the run goes.

Rank 0 appends every step's global metrics to ``OUTPUT/metrics.jsonl`` (the driver follows
it to print progress) and to TensorBoard event files in ``OUTPUT/tensorboard/`` (the format
TensorBoard, W&B's and MLflow's importers all read). Every rank sends its Python logging and
warnings (DeepSpeed's included) to ``OUTPUT/logs/rank{N}.log`` instead of the console. On S3,
where files cannot be appended to, the event and log files are written locally and
uploaded at every checkpoint and at the end.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile

from medvl import storage

TAGS = ("loss", "lr", "grad_norm", "tokens_per_s", "padding", "data_wait")


class Tracker:
    def __init__(self, output: str, rank: int, start_step: int, history: list[dict]):
        self.output, self.rank = output, rank
        self.remote = "://" in output and not output.startswith("file://")
        self.local = tempfile.mkdtemp(prefix="medvl-track-") if self.remote else storage.resolve(output)[1]
        self.metrics = storage.join(output, "metrics.jsonl")
        self._log_to_file(os.path.join(self.local, "logs", f"rank{rank}.log"))
        self.writer = None
        if rank == 0:
            from tensorboardX import SummaryWriter

            # purge_step: events after the restored step (a crashed attempt's) are dropped.
            self.writer = SummaryWriter(os.path.join(self.local, "tensorboard"), purge_step=start_step or None)
            storage.write_text(self.metrics, _lines(history))  # what the restored run holds

    @staticmethod
    def _log_to_file(path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.captureWarnings(True)  # py.warnings -> the root logger -> the file
        logging.getLogger().addHandler(handler)
        for name in ("DeepSpeed", "ray.data", "ray.train"):  # loggers with their own console handlers
            log = logging.getLogger(name)
            log.addHandler(handler)
            log.propagate = False  # each record once, in the file
            for h in log.handlers:
                if h is not handler and not isinstance(h, logging.FileHandler):
                    h.setLevel(logging.ERROR)

    def log(self, records: list[dict], history: list[dict]) -> None:
        """Rank 0: the new per-step records (``history`` already ends with them)."""
        if self.writer is None or not records:
            return
        for r in records:
            for tag in TAGS:
                if r.get(tag) is not None:
                    self.writer.add_scalar(f"train/{tag}", r[tag], r["step"])
            if r.get("val_loss") is not None:
                self.writer.add_scalar("val/loss", r["val_loss"], r["step"])
        self.writer.flush()
        if self.remote:
            storage.write_text(self.metrics, _lines(history))
        else:
            with open(storage.resolve(self.metrics)[1], "a") as f:
                f.write(_lines(records))

    def sync(self) -> None:
        """Upload the event and log files (S3 outputs); a no-op for local ones."""
        if self.writer is not None:
            self.writer.flush()
        if self.remote:
            for sub in ("tensorboard", "logs"):
                if os.path.isdir(os.path.join(self.local, sub)):
                    for name in os.listdir(os.path.join(self.local, sub)):
                        storage.upload_file(os.path.join(self.local, sub, name), storage.join(self.output, sub, name))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.sync()


def _lines(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)
