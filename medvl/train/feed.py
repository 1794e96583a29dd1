"""The training feed: each rank streams only its own rows, in plan order, from the shards.

A plan fixes, before step 1, which rows every rank trains on at every step, from the shard
row counts alone (the driver never reads the data). Per epoch the shards are shuffled
and concatenated, wrapped round to a whole number of global batches (no row dropped,
as torch's ``DistributedSampler`` pads), and cut into one contiguous range per rank. So a
rank's rows lie in a few consecutive shards, and it reads those (64-row Parquet row
groups) and nothing else: bytes read per rank do not grow with the number of ranks.

Inside its range a rank works in windows of ``WINDOW_STEPS`` steps: a window's rows are
shuffled, sorted by length (LLaVA's length grouping, which keeps padding low) and cut
into steps whose order is shuffled again. Each window is one Ray Data read task, run on
the rank's own node, that emits its rows in plan order with their position (``order``), so
the loop can check that it trains on exactly the row the plan says, and the node it ran on
(``read_node``, recorded in ``feed/rankN.json``); a resume starts reading at the window of
its step. Everything is a function of (seed, rank, window): a resumed run sees the same
batches as an uninterrupted one.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from ray.data._internal.execution.execution_callback import ExecutionCallback
from ray.data.block import BlockMetadata
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.data.datasource import Datasource, ReadTask

from medvl import storage
from medvl.train.batching import collate

WINDOW_STEPS = 32  # steps per length-grouping window (HF's megabatch is 50 batches, LLaVA's 1)
FEED_COLUMNS = ["input_ids", "labels", "pixels", "length"]
READ_AHEAD = 2  # windows read at once per rank: ~750 rows/s each on one core, a GPU takes ~60
LOOP_PAUSE_S = 0.05  # Ray Data's scheduling loop rests this long per step (see PacedLoop)
NODE_ID_BYTES = 28  # a Ray node id (56 hex digits)
NODE_LABEL = "ray.io/node-id"  # the label Ray gives every node: its id


@dataclass(frozen=True)
class FeedPlan:
    """Everything that decides the batch order; identical on the driver and every rank."""

    shards: tuple[str, ...]  # shard URIs, in manifest order
    shard_rows: tuple[int, ...]  # kept rows per shard
    world: int
    share: int  # rows per rank per optimizer step (micro batch x grad_accum)
    seed: int
    epochs: int
    group_by_length: bool
    max_steps: int = 0

    @cached_property
    def starts(self) -> np.ndarray:
        """Global row id of each shard's first row (and one past the last)."""
        return np.concatenate([[0], np.cumsum(self.shard_rows)])

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """Global row ids of one epoch: shards shuffled, wrapped to whole global batches."""
        starts = self.starts
        rng = np.random.default_rng([self.seed, epoch])
        rows = np.concatenate([np.arange(starts[s], starts[s + 1])
                               for s in rng.permutation(len(self.shard_rows))])
        pad = (-len(rows)) % (self.world * self.share)
        return np.concatenate([rows, np.resize(rows, pad)]) if pad else rows

    @property
    def steps(self) -> int:
        per_epoch = -(-sum(self.shard_rows) // (self.world * self.share))
        total = per_epoch * self.epochs
        return min(total, self.max_steps) if self.max_steps else total

    def rank_rows(self, rank: int) -> np.ndarray:
        """This rank's global row ids, epoch after epoch, before windows reorder them; all
        epochs even with ``max_steps`` (which only stops the reading early), so a short run
        trains on the same batches as the first steps of a long one."""
        parts = []
        for epoch in range(self.epochs):
            rows = self.epoch_rows(epoch)
            n = len(rows) // self.world
            parts.append(rows[rank * n:(rank + 1) * n])
        return np.concatenate(parts)

    def window_order(self, rank: int, window: int, lengths: np.ndarray) -> np.ndarray:
        """Positions (into the window's rows as read) in plan order."""
        rng = np.random.default_rng([self.seed, rank, window])
        order = rng.permutation(len(lengths))
        if self.group_by_length:
            order = order[np.argsort(-lengths[order], kind="stable")]
        steps = order.reshape(-1, self.share)
        return steps[rng.permutation(len(steps))].ravel()


def plan_rows(plan: FeedPlan, rank: int, lengths: np.ndarray) -> np.ndarray:
    """A rank's global row ids in the order its feed yields them, given every row's length
    (for checks and baselines that hold the whole corpus; the feed itself reads per window)."""
    rows, span = plan.rank_rows(rank), WINDOW_STEPS * plan.share
    windows = np.split(rows, range(span, len(rows), span))
    ordered = np.concatenate([w[plan.window_order(rank, i, lengths[w])] for i, w in enumerate(windows)])
    return ordered[: plan.steps * plan.share]


def locate(plan: FeedPlan, rows: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Global row ids -> ``(shard, local row ids)`` runs, in the given order."""
    starts = plan.starts
    shard = np.searchsorted(starts, rows, side="right") - 1
    cuts = np.flatnonzero(np.diff(shard)) + 1
    return [(int(shard[c[0]]), rows[c] - starts[shard[c[0]]]) for c in np.split(np.arange(len(rows)), cuts)]


class CountingFile(io.RawIOBase):
    """A seekable reader that counts the bytes it hands out: the feed's per-rank byte counter."""

    def __init__(self, f):
        self.f, self.bytes_read = f, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.f.seek(pos, whence)

    def tell(self) -> int:
        return self.f.tell()

    def readinto(self, b) -> int:
        data = self.f.read(len(b))
        b[: len(data)] = data
        self.bytes_read += len(data)
        return len(data)


def read_footer(f: io.RawIOBase) -> pq.FileMetaData:
    """The Parquet footer, reading exactly its bytes (pyarrow's own first read takes the
    last 64 KB: more than a small shard's row group)."""
    f.seek(-8, io.SEEK_END)
    tail = f.read(8)
    size = int.from_bytes(tail[:4], "little")
    f.seek(-8 - size, io.SEEK_END)
    return pq.read_metadata(pa.BufferReader(b"PAR1" + f.read(size) + tail))


def read_row_groups(uri: str, local: np.ndarray, columns: list[str]) -> tuple[pa.Table, np.ndarray, int]:
    """The row groups of one shard holding rows ``local``, where those rows sit in them (in
    the order asked), and the bytes read."""
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as raw:
        f = CountingFile(raw)
        pf = pq.ParquetFile(f, metadata=read_footer(f))
        sizes = np.array([pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)])
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        group = np.searchsorted(bounds, local, side="right") - 1
        chosen = np.unique(group)
        table = pf.read_row_groups(chosen.tolist(), columns=columns)
    base = np.concatenate([[0], np.cumsum(sizes[chosen])])
    return table, base[np.searchsorted(chosen, group)] + local - bounds[group], f.bytes_read


def read_window(plan: FeedPlan, rank: int, window: int, rows: np.ndarray, first: int,
                skip: int, stop: int, node: bytes = b"") -> Iterator[pa.Table]:
    """One window's rows in plan order, one table per step, from ``skip`` (what a resume
    has trained already) to ``stop`` (the run's last step). ``order`` is each row's
    position in the rank's stream; ``read_bytes`` and ``read_node`` (on the first row) what
    this task read from storage and ``node``, the node it runs on. Pixels are copied once: one
    ``take`` from the row groups read."""
    tables, index, read, offset = [], [], 0, 0
    for shard, local in locate(plan, rows):
        table, at, n = read_row_groups(plan.shards[shard], local, FEED_COLUMNS)
        tables.append(table)
        index.append(at + offset)
        offset += table.num_rows
        read += n
    groups = pa.concat_tables(tables).combine_chunks()  # take is slow on many chunks
    index = np.concatenate(index)
    index = index[plan.window_order(rank, window, groups["length"].to_numpy()[index])]
    table = groups.take(index).append_column("order", pa.array(np.arange(first, first + len(rows)), pa.int64()))
    counter = np.zeros(len(rows), np.int64)
    counter[skip] = read  # the first step this task yields carries its bytes and its node
    nodes = np.full(len(rows), b"", object)
    nodes[skip] = node
    for start in range(skip, stop, plan.share):
        part = slice(start, start + plan.share)
        yield (table.slice(start, plan.share).append_column("read_bytes", pa.array(counter[part]))
               .append_column("read_node", pa.array(nodes[part], pa.binary())))


class FeedSource(Datasource):
    """A rank's stream from step ``start`` on: one read task per window."""

    def __init__(self, plan: FeedPlan, rank: int, start: int):
        self.plan, self.rank, self.start = plan, rank, start
        self.rows = plan.rank_rows(rank)

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def windows(self) -> range:
        """The windows from the one holding step ``start`` to the last."""
        span = WINDOW_STEPS * self.plan.share
        return range(self.start * self.plan.share // span, -(-self.plan.steps * self.plan.share // span))

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        plan, rank = self.plan, self.rank  # the tasks capture these, not the whole stream
        span = WINDOW_STEPS * plan.share
        skip_to, end = self.start * plan.share, plan.steps * plan.share
        tasks = []
        for window in self.windows():
            first = window * span
            rows = self.rows[first:first + span]
            skip, stop = max(0, skip_to - first), min(len(rows), end - first)
            meta = BlockMetadata(num_rows=stop - skip, size_bytes=None, input_files=None, exec_stats=None)
            tasks.append(ReadTask(
                lambda w=window, r=rows, f=first, a=skip, b=stop: read_window(plan, rank, w, r, f, a, b, this_node()),
                meta, per_task_row_limit=per_task_row_limit))
        return tasks


def this_node() -> bytes:
    """The id of the node this Ray task runs on."""
    return bytes.fromhex(ray.get_runtime_context().get_node_id())


class PacedLoop(ExecutionCallback):
    """Rests Ray Data's scheduling loop between steps. The loop's only wait is ``ray.wait``
    on unfinished task outputs; once the feed is ``READ_AHEAD`` windows ahead of training,
    as it is whenever reading outpaces the model, nothing makes it wait and it spins. That
    loop is a thread of the training worker: in a 300-step stage-1 probe it held 55% of a
    core and the GIL, and a step took 2x as long as with pre-read batches. The rest delays
    the next read by at most ``LOOP_PAUSE_S``, against windows that last 32 steps."""

    def on_execution_step(self, executor) -> None:
        time.sleep(LOOP_PAUSE_S)


def rank_feed(plan: FeedPlan, rank: int, start: int) -> ray.data.Dataset:
    """This rank's rows from step ``start`` on, in plan order (a Ray Dataset, streamed)."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    if PacedLoop not in ctx.custom_execution_callback_classes:
        ctx.custom_execution_callback_classes.append(PacedLoop)
    ctx.enable_progress_bars = False  # one bar per rank would bury the loop's own progress lines
    source = FeedSource(plan, rank, start)
    # Reads run on this worker's node, and only there: left to the context's default (SPREAD)
    # they land on any node, and every row crosses the network twice (storage -> that node ->
    # here). A task option, so a named one: other keywords of read_datasource go to the
    # datasource (as `scheduling_strategy=` did, silently, before).
    here = {NODE_LABEL: ray.get_runtime_context().get_node_id()}
    # One block per window: left alone, Ray splits a few big read tasks into 1-row blocks
    # (200 of them per task), and the feed ran at 110 rows/s instead of 800. At most
    # READ_AHEAD windows in flight per rank (~350 MB each at 1024 x 336 px): every rank runs
    # its own executor, and each would otherwise size itself to the whole node.
    return ray.data.read_datasource(source, override_num_blocks=len(source.windows()),
                                    concurrency=READ_AHEAD, label_selector=here)


class FeedCollate(NumpyBatchCollateFn):
    """Rows -> tensors in Ray Data's prefetch threads; ``order``, ``read_bytes`` and
    ``read_node`` (one row of node id bytes per read task starting here) ride along: a
    batch of tensors only, so Ray still moves it to the device."""

    def __init__(self, pad_id: int, image_size: int):
        self.pad_id, self.image_size = pad_id, image_size

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        batch = collate(rows, self.pad_id, self.image_size)
        batch["order"] = torch.tensor(rows["order"])
        batch["read_bytes"] = torch.tensor(int(rows["read_bytes"].sum()))
        batch["read_node"] = self.read_nodes(rows)
        return batch

    @staticmethod
    def read_nodes(rows: dict[str, np.ndarray]) -> torch.Tensor:
        """The node ids the rows carry (empty on all but a task's first), one uint8 row each."""
        return torch.tensor(np.frombuffer(b"".join(rows["read_node"]), np.uint8).reshape(-1, NODE_ID_BYTES))


def record_read(feed: dict, batch: dict) -> None:
    """Move what the read tasks noted in ``batch`` into the rank's feed record: the bytes
    they read and the nodes they ran on."""
    feed["read_bytes"] += batch.pop("read_bytes").item()
    nodes = {bytes(n).hex() for n in batch.pop("read_node").tolist()}
    feed["read_nodes"] = sorted(nodes.union(feed["read_nodes"]))
