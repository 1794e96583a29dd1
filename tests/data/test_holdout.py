"""The held-out split: a function of the record's image (its id without one) alone."""

import pyarrow as pa
import pytest

from medvl.data.holdout import held_out, holdout_key, split


def test_the_held_out_share_is_the_fraction_and_depends_on_the_id_only():
    ids = [f"rec-{i}" for i in range(20_000)]
    picked = [i for i in ids if held_out(i, 0.05)]
    assert len(picked) / len(ids) == pytest.approx(0.05, abs=0.005)
    assert picked == [i for i in reversed(ids) if held_out(i, 0.05)][::-1]  # order does not matter
    assert set(picked) <= {i for i in ids if held_out(i, 0.1)}  # a larger fraction keeps these
    assert not any(held_out(i, 0.0) for i in ids)


def test_split_sends_every_row_to_exactly_one_side_and_an_image_to_one_side():
    ids = [f"r{i}" for i in range(1500)]
    keys = [holdout_key(f"img{n // 3}.png", i) for n, i in enumerate(ids)]  # three questions per image
    rows = pa.table({"id": ids, "holdout_key": keys})
    train, val = split(rows, 0.2)
    assert train.num_rows + val.num_rows == 1500 and val.num_rows > 150
    assert not set(train["holdout_key"].to_pylist()) & set(val["holdout_key"].to_pylist())
    assert val["id"].to_pylist() == [i for i, k in zip(ids, keys, strict=True) if held_out(k, 0.2)]
    assert holdout_key(None, "r1") != holdout_key("r1", "r1")  # no image: the id, in its own namespace
