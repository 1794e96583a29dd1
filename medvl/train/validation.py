"""The validation loss: the training loss on the held-out rows (``val/`` shards, split off at
preprocessing by ``data/holdout.py``), every ``val_every`` steps, over the whole val set.

Each rank reads one contiguous range of the val rows once, at start-up (the row groups
holding them and nothing else), and keeps them on the host as uint8 batches: at 1000 rows
over 8 ranks that is ~125 rows x 338 KB = 42 MB per rank, against 5.6 GB if every rank read
all of them in bf16. A pass is the training loss path itself (``loss.causal_lm_loss``,
labelled positions only) in eval mode without gradients; each rank sums loss x labelled
tokens and the tokens, and one host all-reduce (``collectives.py``) gives the token-weighted
mean over every val row, whatever its rank.

Every rank runs the same number of forwards (ZeRO-3 gathers each layer's parameters with a
collective every rank must join): a rank with fewer rows repeats its last batch with no
label, which adds nothing to either sum. Module modes and the RNG state are restored after
the pass, so validating never changes the training trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa
import torch

from medvl.data.tokenize import IGNORE
from medvl.train.batching import collate, model_inputs
from medvl.train.collectives import all_reduce_sum
from medvl.train.feed import locate, read_row_groups
from medvl.train.loss import causal_lm_loss

VAL_COLUMNS = ["input_ids", "labels", "pixels"]


@dataclass(frozen=True)
class ValPlan:
    """Which val rows each rank holds: identical on the driver and every rank."""

    shards: tuple[str, ...]  # val shard URIs, in manifest order
    shard_rows: tuple[int, ...]
    world: int
    batch_size: int

    @cached_property
    def starts(self) -> np.ndarray:
        """Global val row id of each shard's first row (``feed.locate`` reads these)."""
        return np.concatenate([[0], np.cumsum(self.shard_rows)])

    def rank_rows(self, rank: int) -> np.ndarray:
        """This rank's val rows: one contiguous range, sizes differing by at most one."""
        return np.array_split(np.arange(sum(self.shard_rows)), self.world)[rank]

    @property
    def batches(self) -> int:
        """Forwards per pass on every rank: the largest rank's row count in batches."""
        return -(-len(self.rank_rows(0)) // self.batch_size)


def load_batches(plan: ValPlan, rank: int, pad_id: int, image_size: int) -> list[dict[str, torch.Tensor]]:
    """This rank's val rows as ``plan.batches`` collated host batches; a rank with no row
    (fewer rows than ranks) holds row 0 with no label, to run its forwards."""
    rows = plan.rank_rows(rank)
    owned = len(rows) > 0
    parts = [read_row_groups(plan.shards[shard], local, VAL_COLUMNS)
             for shard, local in locate(plan, rows if owned else np.arange(1))]
    table = pa.concat_tables([t.take(at) for t, at, _ in parts])
    batches = [collate(table.slice(i, plan.batch_size).to_pydict(), pad_id, image_size)
               for i in range(0, table.num_rows, plan.batch_size)]
    if not owned:
        batches = [unlabelled(batches[0])]
    return batches + [unlabelled(batches[-1])] * (plan.batches - len(batches))


def unlabelled(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` with every label ignored: a forward that counts for nothing."""
    return {**batch, "labels": torch.full_like(batch["labels"], IGNORE)}


def validation_loss(engine, batches: list[dict[str, torch.Tensor]]) -> float:
    """Token-weighted mean loss over every rank's val rows (collective: all ranks call it at
    the same step). Eval mode, no gradients, RNG forked; each module's mode is restored."""
    modes = [(m, m.training) for m in engine.modules()]
    engine.eval()
    total = tokens = 0.0
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[engine.device] if engine.device.type == "cuda" else []):
            for batch in batches:
                inputs = model_inputs(batch, engine.device)
                n = int((inputs["labels"][:, 1:] != IGNORE).sum())
                total += causal_lm_loss(engine, inputs).item() * n  # the mean over n labelled tokens
                tokens += n
    finally:
        for module, mode in modes:
            module.train(mode)
    ((total, tokens),) = all_reduce_sum([[total, tokens]])
    return total / tokens if tokens else float("nan")


def val_due(every: int, step: int, steps: int, save: bool) -> bool:
    """Whether step ``step`` (1-based) validates: every ``every`` steps (-1: at every
    checkpoint; 0: never), and at the last step unless off."""
    if every == 0:
        return False
    return step == steps or (save if every < 0 else step % every == 0)
