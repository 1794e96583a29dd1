"""Host memory of a training worker, per phase, so a run says what it needs per process.

At 13B the phases differ by tens of GB (loading the towers, DeepSpeed set-up, training,
export), and node sizing needs the peak of each. A watcher process samples this process's
anonymous RSS every 20 ms (resident memory minus file-backed pages: a model file mapped
by safetensors is page cache, reclaimable and shared by a node's workers, not memory the
process owns); ``mark`` closes a phase with its peak and the RSS it leaves behind. Each
rank writes its phases to ``OUTPUT/memory/rank{r}.json`` (read by ``benchmarks/memory.py``).

The sampler is a process, not a thread: a thread waking 100 times a second takes the GIL
from the training loop, and on the CPU benchmark that cost 5-7% of the stage-1 step time.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys

from medvl import storage


class Statm:
    """Resident memory a process owns (RSS less file-backed and shared pages), read from its
    ``/proc/PID/statm``, kept open. One ``pread`` per sample: psutil opens and parses the
    file each time, 6x the cost, and its watcher took 4% of a core beside every worker."""

    PAGE = os.sysconf("SC_PAGE_SIZE")

    def __init__(self, pid: int):
        self.fd = os.open(f"/proc/{pid}/statm", os.O_RDONLY)

    def anon(self) -> int:
        """Raises OSError once the process has exited."""
        rss, shared = os.pread(self.fd, 128, 0).split()[1:3]
        return (int(rss) - int(shared)) * self.PAGE

    def close(self) -> None:
        os.close(self.fd)


def release_free_memory() -> None:
    """Hand freed heap back to the OS. Loading gathers and frees every module once (ZeRO-3)
    or casts tensors; glibc keeps such memory for reuse, so without this a worker holds
    about a full model's worth it no longer uses (measured: 1.3 -> 0.66 GB per rank on the
    rehearsal), RAM its node's other workers need."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def return_large_frees_at_once(threshold: int = 1 << 20) -> None:
    """Serve host allocations of ``threshold`` bytes and more with their own mappings, which
    ``free`` unmaps at once. glibc's default threshold grows to 32 MB, so the tensors of a
    rehearsal or 13B run (ZeRO-3 partitions, gathered blocks, gradients: 1-30 MB each) come
    from heap arenas that keep what is freed: measured on the ZeRO-3 rehearsal, the worker
    held ~1 W more after its first forward and backward than they need
    (benchmarks/memory.py). ``malloc_trim`` returns it only when called; this never lets it
    build up. The price is a page fault per page of each new such tensor: ~12% of a CPU
    forward + backward of a 2-layer h-1536 LLM (gradients reallocated every step); a GPU
    worker allocates no such tensors on the host per step. Call before the model loads."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc: its own policy
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD


def device_peak() -> int:
    """Peak GPU memory this process allocated since the previous call (0 without CUDA): the
    figure a GPU run is sized by, per phase like the host's."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0
    peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    return peak


def watch(pid: int, interval: float = 0.02) -> None:
    """The watcher's loop: sample ``pid``'s anonymous RSS; on each line from stdin, answer
    the peak since the previous line. Ends when the worker closes the pipe or exits. At
    20 ms it takes 0.8% of a core, and a 13B run's memory peaks (gathers, casts of GB
    tensors) last far longer than that."""
    statm = Statm(pid)
    peak = 0
    while True:
        try:
            peak = max(peak, statm.anon())
        except OSError:
            return
        if select.select([sys.stdin], [], [], interval)[0]:
            if not sys.stdin.readline():
                return
            print(peak, flush=True)
            peak = 0


class PhasePeaks:
    def __init__(self):
        self._statm = Statm(os.getpid())
        self.idle = self._statm.anon()  # before the model exists
        self.phases: dict[str, dict[str, int]] = {}
        self._watcher = subprocess.Popen([sys.executable, "-m", "medvl.train.memory", str(os.getpid())],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def mark(self, phase: str) -> None:
        """End ``phase``: record its peak RSS and the RSS now, where the next phase starts."""
        now = self._statm.anon()
        peak = 0
        with contextlib.suppress(OSError):  # a watcher gone (killed) costs its figure, not the run
            self._watcher.stdin.write("\n")
            self._watcher.stdin.flush()
            peak = int(self._watcher.stdout.readline() or 0)
        self.phases[phase] = {"peak": max(peak, now), "end": now, "device_peak": device_peak()}

    def mark_first(self, phase: str) -> None:
        """``mark`` the first time only: the first step's forward, backward and optimizer step
        (and the first checkpoint) as phases of their own, what each adds to the peak; the
        later ones fall into the phase that follows them ("train")."""
        if phase not in self.phases:
            self.mark(phase)

    def write(self, output: str, rank: int) -> None:
        """Write this rank's phases and stop the watcher: the last call."""
        report = {"idle": self.idle, "phases": self.phases}
        storage.write_text(storage.join(output, "memory", f"rank{rank}.json"), json.dumps(report, indent=1))
        with contextlib.suppress(OSError):
            self._watcher.stdin.close()  # the watcher ends with the pipe
        self._watcher.wait()
        self._statm.close()  # a worker builds one PhasePeaks per run attempt: no fd left open


if __name__ == "__main__":
    watch(int(sys.argv[1]))
