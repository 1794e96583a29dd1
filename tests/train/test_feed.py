"""The feed's plan (the data position of every step) against hand-checked facts, and the
feed itself against the plan on real shards (rows, order, bytes read)."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from medvl.train.batching import padding_fraction
from medvl.train.feed import (
    WINDOW_STEPS,
    FeedCollate,
    FeedPlan,
    plan_rows,
    read_window,
    record_read,
)


def _plan(shard_rows, world=2, share=4, epochs=1, seed=1, group=True, max_steps=0) -> FeedPlan:
    return FeedPlan(shards=tuple(f"s{i}" for i in range(len(shard_rows))), shard_rows=tuple(shard_rows),
                    world=world, share=share, seed=seed, epochs=epochs, group_by_length=group,
                    max_steps=max_steps)


def test_each_epoch_covers_every_row_once_padding_by_wrap_around():
    plan = _plan([40, 23, 40], world=2, share=4, epochs=2)  # 103 rows: not a multiple of 8
    assert plan.steps == 2 * 13
    streams = [plan.rank_rows(r) for r in range(2)]
    for epoch in range(2):
        rows = np.concatenate([s[epoch * 52:(epoch + 1) * 52] for s in streams])
        ids, counts = np.unique(rows, return_counts=True)
        assert len(ids) == 103 and counts.sum() - 103 == (-103) % 8 and counts.max() == 2
    assert not np.array_equal(plan.epoch_rows(0), plan.epoch_rows(1))  # each epoch shuffled anew


def test_a_rank_reads_a_contiguous_run_of_shards():
    plan = _plan([64] * 16, world=4, share=8)
    starts = np.arange(0, 1025, 64)
    for r in range(4):
        shards = np.unique(np.searchsorted(starts, plan.rank_rows(r), side="right") - 1)
        assert len(shards) == 4  # its quarter of the corpus, not a sample of every shard


def test_plan_is_deterministic_and_seeded():
    lengths = np.random.default_rng(0).integers(50, 600, 500)
    a = plan_rows(_plan([250, 250], seed=3), 1, lengths)
    assert np.array_equal(a, plan_rows(_plan([250, 250], seed=3), 1, lengths))
    assert not np.array_equal(a, plan_rows(_plan([250, 250], seed=4), 1, lengths))


def test_windows_only_reorder_their_own_rows():
    lengths = np.random.default_rng(0).integers(50, 600, 1000)
    plan = _plan([500, 500], share=4)
    span = WINDOW_STEPS * 4
    raw, ordered = plan.rank_rows(0), plan_rows(plan, 0, lengths)
    for w in range(0, len(raw), span):
        assert sorted(raw[w:w + span]) == sorted(ordered[w:w + span])


def test_length_grouping_cuts_padding():
    lengths = np.random.default_rng(0).lognormal(5, 0.8, 4096).astype(int) + 1
    grouped = padding_fraction(lengths, plan_rows(_plan([4096], share=8), 0, lengths), 8)
    random = padding_fraction(lengths, plan_rows(_plan([4096], share=8, group=False), 0, lengths), 8)
    assert grouped < random / 3


def test_max_steps_stops_early_on_the_same_batches():
    lengths = np.random.default_rng(0).integers(5, 500, 1000)
    short, full = _plan([1000], world=2, share=4, max_steps=5), _plan([1000], world=2, share=4)
    assert short.steps == 5
    assert np.array_equal(plan_rows(short, 1, lengths), plan_rows(full, 1, lengths)[:20])


def _shards(tmp_path, shard_rows: list[int]) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 50, sum(shard_rows))
    paths, start = [], 0
    for i, n in enumerate(shard_rows):
        ids = np.arange(start, start + n)
        table = pa.table({"input_ids": [[int(x)] * int(lengths[x]) for x in ids], "labels": [[1]] * n,
                          "pixels": [bytes(100)] * n, "length": lengths[ids].astype(np.int32)})
        paths.append(str(tmp_path / f"part-{i}.parquet"))
        pq.write_table(table, paths[-1], row_group_size=8)
        start += n
    return paths, lengths


def test_a_window_yields_its_rows_in_plan_order_and_counts_only_their_row_groups(tmp_path):
    paths, lengths = _shards(tmp_path, [200, 200, 200])
    plan = FeedPlan(tuple(paths), (200, 200, 200), world=3, share=4, seed=0, epochs=1, group_by_length=True)
    want = plan_rows(plan, 1, lengths)
    span = WINDOW_STEPS * 4
    rows = plan.rank_rows(1)[span:2 * span]  # the second window: 72 rows
    end = span + len(rows)
    node = bytes(range(28))
    steps = list(read_window(plan, 1, 1, rows, first=span, skip=8, stop=len(rows), node=node))  # resumed at step 2
    table = pa.concat_tables(steps)
    assert table["read_node"].to_pylist() == [node] + [b""] * (len(rows) - 9)  # once per task
    assert [ids[0] for ids in table["input_ids"].to_pylist()] == want[span + 8:end].tolist()
    assert table["order"].to_pylist() == list(range(span + 8, end))
    read = sum(table["read_bytes"].to_pylist())
    total = sum((tmp_path / f"part-{i}.parquet").stat().st_size for i in range(3))
    assert 0 < read < 0.5 * total  # 72 of 600 rows: their row groups, not the shards


def test_the_loop_records_the_bytes_and_nodes_of_the_read_tasks_in_its_batches():
    feed = {"read_bytes": 5, "read_nodes": ["00" * 28]}
    rows = {"read_bytes": np.array([7, 0, 3]), "read_node": np.array([bytes(28), b"", bytes([1] * 28)], object)}
    batch = {"read_bytes": torch.tensor(int(rows["read_bytes"].sum())),
             "read_node": FeedCollate.read_nodes(rows), "order": torch.arange(3)}
    record_read(feed, batch)
    assert feed == {"read_bytes": 15, "read_nodes": ["00" * 28, "01" * 28]} and list(batch) == ["order"]
