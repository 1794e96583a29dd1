"""Raw records as a Ray Dataset of ``{line, text}``, read in parallel without the driver
ever holding the corpus.

The driver makes one streaming pass over the file: for JSONL it notes the byte offset of
every ``chunk_lines``-th line; a JSON array (ChiMed-VL ships one) is rewritten as JSONL
beside the output (``records.jsonl``, line n = item n, so a reject's line number finds
it) while the same pass takes the offsets. Ray Data read tasks then read one byte range
each, so line numbers stay exact (rejects name them) and memory stays one chunk per task.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from medvl import storage

READ_BLOCK = 1 << 20  # bytes per read during the indexing pass


@dataclass(frozen=True)
class Chunk:
    offset: int  # byte offset of its first line
    size: int  # bytes
    first_line: int  # 1-based number of its first line


@dataclass
class RecordsFile:
    uri: str  # a JSONL file
    chunks: list[Chunk]
    records: int  # non-blank lines: what ``records_in`` counts


class _Indexer:
    """Fed lines as they stream past; keeps one ``Chunk`` per ``chunk_lines`` lines."""

    def __init__(self, chunk_lines: int):
        self.chunk_lines, self.chunks = chunk_lines, []
        self.records = self.lines = self.pos = self.start = 0

    def add(self, line: bytes) -> None:  # ``line`` with its newline, if it has one
        self.lines += 1
        self.pos += len(line)
        self.records += bool(line.strip())
        if self.lines % self.chunk_lines == 0:
            self._close_chunk()

    def _close_chunk(self) -> None:
        if self.pos > self.start:
            first = self.lines - (self.lines - 1) % self.chunk_lines
            self.chunks.append(Chunk(self.start, self.pos - self.start, first))
            self.start = self.pos

    def result(self, uri: str) -> RecordsFile:
        self._close_chunk()
        return RecordsFile(uri, self.chunks, self.records)


def index_jsonl(uri: str, chunk_lines: int) -> RecordsFile:
    """One streaming pass: the byte ranges of ``chunk_lines``-line chunks."""
    fs, path = storage.resolve(uri)
    index, tail = _Indexer(chunk_lines), b""
    with fs.open_input_stream(path) as f:
        while block := f.read(READ_BLOCK):
            lines = (tail + block).split(b"\n")
            tail = lines.pop()
            for line in lines:
                index.add(line + b"\n")
    if tail:
        index.add(tail)
    return index.result(uri)


def json_array_to_jsonl(uri: str, dest: str, chunk_lines: int) -> RecordsFile:
    """Rewrite a JSON array as JSONL at ``dest`` in one streaming pass (ijson), indexing it."""
    import ijson

    src_fs, src = storage.resolve(uri)
    fs, path = storage.resolve(dest)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    index = _Indexer(chunk_lines)
    try:
        with src_fs.open_input_stream(src) as f, fs.open_output_stream(path) as out:
            for item in ijson.items(f, "item", use_float=True):
                line = (json.dumps(item, ensure_ascii=False) + "\n").encode()
                out.write(line)
                index.add(line)
    except ijson.JSONError as e:
        raise ValueError(f"{uri}: not a valid JSON array ({str(e).splitlines()[0]}); "
                         "use .jsonl to isolate bad records") from e
    return index.result(dest)


def open_records(uri: str, output: str, chunk_lines: int) -> RecordsFile:
    """JSONL as is; a JSON array (by its first character) converted beside ``output``."""
    fs, path = storage.resolve(uri)
    with fs.open_input_stream(path) as f:
        head = f.read(4096).lstrip()
    if uri.endswith(".jsonl") or not head.startswith(b"["):
        return index_jsonl(uri, chunk_lines)
    return json_array_to_jsonl(uri, storage.join(output, "records.jsonl"), chunk_lines)


def read_chunk(uri: str, chunk: Chunk) -> Iterator[pa.Table]:
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        data = f.read_at(chunk.size, chunk.offset)
    lines = data.decode("utf-8", errors="replace").split("\n")
    numbered = [(chunk.first_line + i, t) for i, t in enumerate(lines) if t.strip()]
    yield pa.table({"line": pa.array([n for n, _ in numbered], pa.int64()),
                    "text": pa.array([t for _, t in numbered], pa.string())})


class RecordSource(Datasource):
    """One read task per chunk: a byte range of the JSONL file."""

    def __init__(self, records: RecordsFile):
        self.records = records

    def estimate_inmemory_data_size(self) -> int:
        return sum(c.size for c in self.records.chunks)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        uri = self.records.uri
        return [ReadTask(lambda c=c: read_chunk(uri, c),
                         BlockMetadata(num_rows=None, size_bytes=c.size, input_files=(uri,), exec_stats=None),
                         per_task_row_limit=per_task_row_limit)
                for c in self.records.chunks]


def read_records(records: RecordsFile, label_selector: dict[str, str] | None = None) -> ray.data.Dataset:
    """One block per chunk (``override_num_blocks``: Ray would split a few big chunks), read
    on the nodes ``label_selector`` picks (``placement.cpu_selector``)."""
    return ray.data.read_datasource(RecordSource(records), override_num_blocks=len(records.chunks),
                                    label_selector=label_selector or None)
