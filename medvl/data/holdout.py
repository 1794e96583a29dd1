"""Which records are held out for the validation loss: a hash of the record's image.

The split is made once, at preprocessing, into a separate set of shards (``val/``), so the
training feed cannot read a held-out row whatever its plan: "never trained on" holds by
construction, and the manifest lists both sets. A hash, not a position, picks the rows: the
same records are held out on every re-run, whatever the chunking of the corpus, the number
of ranks or a resume, and no pass over the data is needed to choose them. The hash is of the
image path (the record id for a record without one): the questions of one image all fall on
the same side, so a held-out image was never seen in training through a sibling record.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc


def held_out(key: str, fraction: float) -> bool:
    """Whether ``key`` (a record's ``holdout_key``) is in the held-out ``fraction`` (uniform
    over keys: sha256)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") < fraction * 2**64


def holdout_key(image: str | None, record_id: str) -> str:
    """What the split hashes: the image path as the record gives it, else the record id."""
    return f"image:{image}" if image else f"id:{record_id}"


def split(rows: pa.Table, fraction: float) -> tuple[pa.Table, pa.Table]:
    """(training rows, held-out rows) of a table with a ``holdout_key`` column."""
    if fraction <= 0:  # the default: no hash per row
        return rows, rows.slice(0, 0)
    mask = pa.array([held_out(k, fraction) for k in rows["holdout_key"].to_pylist()], pa.bool_())
    return rows.filter(pc.invert(mask)), rows.filter(mask)
