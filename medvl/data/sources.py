"""Raw records as a Ray Dataset of ``{line, text}``, read in parallel without the driver
ever holding the corpus.

The driver makes one streaming pass over the file: for JSONL it notes the byte offset of
every ``step``-th line (``step`` grows with the file, so the driver keeps at most
``MAX_MARKS`` offsets); a JSON array (ChiMed-VL ships one) is rewritten as JSONL beside the
output (``records.jsonl``, line n = item n, so a reject's line number finds it) while the
same pass takes the offsets. The chunk size is chosen afterwards, from the record count
and the cluster (``chunk_lines``): one Ray Data read task per chunk reads one byte range,
so line numbers stay exact (rejects name them) and memory stays one chunk per task.
"""

from __future__ import annotations

import json
import math
from array import array
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from medvl import storage

READ_BLOCK = 1 << 20  # bytes per read during the indexing pass
MAX_MARKS = 1 << 14  # line offsets the index keeps (8 bytes each) before it keeps every other one
TASKS_PER_CPU = 4  # chunks per CPU when the corpus allows: a slow chunk (DICOM-heavy) does not leave CPUs idle
MIN_CHUNK_LINES = 64  # below this a chunk pays more in task start-up than it does work


@dataclass(frozen=True)
class Chunk:
    offset: int  # byte offset of its first line
    size: int  # bytes
    first_line: int  # 1-based number of its first line


@dataclass
class RecordsFile:
    uri: str  # a JSONL file
    marks: array  # byte offset of line ``i * step + 1``, for every i
    step: int  # lines between marks (a power of two)
    size: int  # bytes
    records: int  # non-blank lines: what ``records_in`` counts
    max_chunk_lines: int  # the most lines a chunk may hold (records per shard)

    def chunks(self, lines: int) -> list[Chunk]:
        """Consecutive byte ranges of ``lines`` lines each, rounded down to a multiple of
        ``step`` (at least one step, at most ``max_chunk_lines``)."""
        k = max(1, min(lines, self.max_chunk_lines) // self.step)
        starts = range(0, len(self.marks), k)
        ends = [self.marks[i + k] if i + k < len(self.marks) else self.size for i in starts]
        return [Chunk(self.marks[i], end - self.marks[i], i * self.step + 1) for i, end in zip(starts, ends, strict=True)]


def chunk_lines(records: int, cpus: int, most: int) -> int:
    """Lines per read task: ``TASKS_PER_CPU`` chunks per CPU, at least ``MIN_CHUNK_LINES``
    unless that would leave CPUs without a chunk (a corpus of 2 x CPUs records still gets
    one chunk per CPU), at most ``most`` (records per shard). A fixed size left small corpora
    on one task: 2,000 records in 1,024-line chunks ran on two CPUs of any cluster."""
    cpus = max(cpus, 1)
    floor = min(MIN_CHUNK_LINES, math.ceil(records / cpus))
    return max(1, min(most, max(floor, math.ceil(records / (cpus * TASKS_PER_CPU)))))


class _Indexer:
    """Fed lines as they stream past; keeps the offset of every ``step``-th line. Past
    ``MAX_MARKS`` offsets it keeps every other one and doubles ``step`` (up to
    ``max_chunk_lines``): bounded memory at any corpus size, one-line chunks for a small one."""

    def __init__(self, max_chunk_lines: int):
        self.max_chunk_lines, self.step, self.marks = max_chunk_lines, 1, array("q")
        self.records = self.lines = self.pos = 0

    def add(self, line: bytes) -> None:  # ``line`` with its newline, if it has one
        if self.lines % self.step == 0:
            self.marks.append(self.pos)
            if len(self.marks) > MAX_MARKS and 2 * self.step <= self.max_chunk_lines:
                self.marks, self.step = self.marks[::2], 2 * self.step
        self.lines += 1
        self.pos += len(line)
        self.records += bool(line.strip())

    def result(self, uri: str) -> RecordsFile:
        return RecordsFile(uri, self.marks, self.step, self.pos, self.records, self.max_chunk_lines)


def index_jsonl(uri: str, max_chunk_lines: int) -> RecordsFile:
    """One streaming pass: the line offsets chunks of up to ``max_chunk_lines`` lines are cut from."""
    fs, path = storage.resolve(uri)
    index, tail = _Indexer(max_chunk_lines), b""
    with fs.open_input_stream(path) as f:
        while block := f.read(READ_BLOCK):
            lines = (tail + block).split(b"\n")
            tail = lines.pop()
            for line in lines:
                index.add(line + b"\n")
    if tail:
        index.add(tail)
    return index.result(uri)


def json_array_to_jsonl(uri: str, dest: str, max_chunk_lines: int) -> RecordsFile:
    """Rewrite a JSON array as JSONL at ``dest`` in one streaming pass (ijson), indexing it."""
    import ijson

    src_fs, src = storage.resolve(uri)
    fs, path = storage.resolve(dest)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    index = _Indexer(max_chunk_lines)
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


def open_records(uri: str, output: str, max_chunk_lines: int) -> RecordsFile:
    """JSONL as is; a JSON array (by its first character) converted beside ``output``."""
    fs, path = storage.resolve(uri)
    with fs.open_input_stream(path) as f:
        head = f.read(4096).lstrip()
    if uri.endswith(".jsonl") or not head.startswith(b"["):
        return index_jsonl(uri, max_chunk_lines)
    return json_array_to_jsonl(uri, storage.join(output, "records.jsonl"), max_chunk_lines)


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

    def __init__(self, uri: str, chunks: list[Chunk]):
        self.uri, self.chunks = uri, chunks

    def estimate_inmemory_data_size(self) -> int:
        return sum(c.size for c in self.chunks)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        uri = self.uri
        return [ReadTask(lambda c=c: read_chunk(uri, c),
                         BlockMetadata(num_rows=None, size_bytes=c.size, input_files=(uri,), exec_stats=None),
                         per_task_row_limit=per_task_row_limit)
                for c in self.chunks]


def read_records(records: RecordsFile, label_selector: dict[str, str] | None = None, *,
                 lines: int = 0, memory: int | None = None) -> ray.data.Dataset:
    """One block per chunk of ``lines`` lines (default: the most a chunk may hold;
    ``override_num_blocks``: Ray would split a few big chunks), read on the nodes
    ``label_selector`` picks (``placement.cpu_selector``), each task declaring ``memory``."""
    chunks = records.chunks(lines or records.max_chunk_lines)
    return ray.data.read_datasource(RecordSource(records.uri, chunks), override_num_blocks=len(chunks),
                                    label_selector=label_selector or None, memory=memory)
