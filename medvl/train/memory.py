"""Host memory of a training worker, per phase, so a run says what it needs per process.

At 13B the phases differ by tens of GB (loading the towers, DeepSpeed set-up, training,
export), and node sizing needs the peak of each. A daemon thread samples this process's
anonymous RSS every 10 ms (resident memory minus file-backed pages: a model file mapped
by safetensors is page cache, reclaimable and shared by a node's workers, not memory the
process owns); ``mark`` closes a phase with its peak and the RSS it leaves behind. Each
rank writes its phases to ``OUTPUT/memory/rank{r}.json`` (read by ``benchmarks/memory.py``).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time

import psutil

from medvl import storage


def anon_rss(proc: psutil.Process) -> int:
    """Resident memory the process owns: RSS less file-backed and shared pages."""
    m = proc.memory_info()
    return m.rss - getattr(m, "shared", 0)


def release_free_memory() -> None:
    """Hand freed heap back to the OS. Loading gathers and frees every module once (ZeRO-3)
    or casts tensors; glibc keeps such memory for reuse, so without this a worker holds
    about a full model's worth it no longer uses (measured: 1.3 -> 0.66 GB per rank on the
    rehearsal), RAM its node's other workers need."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PhasePeaks(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self._proc = psutil.Process()
        self.idle = anon_rss(self._proc)  # before the model exists
        self._peak = self.idle
        self.phases: dict[str, dict[str, int]] = {}
        self.start()

    def run(self) -> None:
        while True:
            self._peak = max(self._peak, anon_rss(self._proc))
            time.sleep(0.01)

    def mark(self, phase: str) -> None:
        """End ``phase``: record its peak RSS and the RSS now, where the next phase starts."""
        now = anon_rss(self._proc)
        self.phases[phase] = {"peak": max(self._peak, now), "end": now}
        self._peak = now

    def write(self, output: str, rank: int) -> None:
        report = {"idle": self.idle, "phases": self.phases}
        storage.write_text(storage.join(output, "memory", f"rank{rank}.json"), json.dumps(report, indent=1))
