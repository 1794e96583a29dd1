"""Which records are held out for the validation loss: a hash of the record id.

The split is made once, at preprocessing, into a separate set of shards (``val/``), so the
training feed cannot read a held-out row whatever its plan: "never trained on" holds by
construction, and the manifest lists both sets. A hash of the id, not a position, picks the
rows: the same records are held out on every re-run, whatever the chunking of the corpus,
the number of ranks or a resume, and no pass over the data is needed to choose them.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc


def held_out(record_id: str, fraction: float) -> bool:
    """Whether ``record_id`` is in the held-out ``fraction`` (uniform over ids: sha256)."""
    return int.from_bytes(hashlib.sha256(record_id.encode()).digest()[:8], "big") < fraction * 2**64


def split(rows: pa.Table, fraction: float) -> tuple[pa.Table, pa.Table]:
    """(training rows, held-out rows) of a table with an ``id`` column."""
    mask = pa.array([held_out(i, fraction) for i in rows["id"].to_pylist()], pa.bool_())
    return rows.filter(pc.invert(mask)), rows.filter(mask)
