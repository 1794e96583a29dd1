"""The held-out split: a function of the record id alone."""

import pyarrow as pa
import pytest

from medvl.data.holdout import held_out, split


def test_the_held_out_share_is_the_fraction_and_depends_on_the_id_only():
    ids = [f"rec-{i}" for i in range(20_000)]
    picked = [i for i in ids if held_out(i, 0.05)]
    assert len(picked) / len(ids) == pytest.approx(0.05, abs=0.005)
    assert picked == [i for i in reversed(ids) if held_out(i, 0.05)][::-1]  # order does not matter
    assert set(picked) <= {i for i in ids if held_out(i, 0.1)}  # a larger fraction keeps these
    assert not any(held_out(i, 0.0) for i in ids)


def test_split_sends_every_row_to_exactly_one_side():
    rows = pa.table({"id": [f"r{i}" for i in range(500)], "x": list(range(500))})
    train, val = split(rows, 0.2)
    assert train.num_rows + val.num_rows == 500 and val.num_rows > 50
    assert not set(train["id"].to_pylist()) & set(val["id"].to_pylist())
    assert val["id"].to_pylist() == [i for i in rows["id"].to_pylist() if held_out(i, 0.2)]
