"""The per-phase memory record of a training worker (``medvl.train.memory``)."""

import json
import subprocess
import sys
import threading
import time

from medvl.train.memory import PhasePeaks


def test_phase_peak_sees_a_transient_allocation_without_a_thread_in_the_worker(tmp_path):
    threads = threading.active_count()
    peaks = PhasePeaks()
    # A sampler thread here would take the GIL from the training loop 100 times a second.
    assert threading.active_count() == threads
    time.sleep(0.5)  # the watcher is up
    block = bytearray(300 * 2**20)
    block[:: 4096] = b"x" * len(block[:: 4096])  # touch every page: resident, not just reserved
    time.sleep(0.1)
    del block
    peaks.mark("load")
    peaks.mark("train")
    peaks.write(str(tmp_path), 0)

    report = json.loads((tmp_path / "memory" / "rank0.json").read_text())
    load, train = report["phases"]["load"], report["phases"]["train"]
    assert load["peak"] - report["idle"] >= 290 * 2**20  # freed before mark: only a sampler sees it
    assert load["end"] < load["peak"] - 200 * 2**20
    assert train["peak"] < load["peak"] - 200 * 2**20  # each phase starts from a fresh peak
    assert peaks._watcher.poll() == 0  # write() ends the watcher


def test_a_killed_watcher_costs_its_figure_not_the_run(tmp_path):
    peaks = PhasePeaks()
    peaks._watcher.kill()
    peaks._watcher.wait()
    peaks.mark("load")  # the RSS now still stands as the phase's peak
    peaks.write(str(tmp_path), 0)
    load = json.loads((tmp_path / "memory" / "rank0.json").read_text())["phases"]["load"]
    assert load["peak"] == load["end"] > 0


def _held_after_freeing(promptly: bool) -> int:
    """Anonymous RSS a fresh process still holds after freeing 19 of 20 8-MB tensors (the last
    one kept: glibc's heap can only shrink from its top)."""
    code = f"""
import torch
from medvl.train.memory import Statm, return_large_frees_at_once
if {promptly}:
    return_large_frees_at_once()
torch.ones(4 * 2**20)  # freed at once: glibc then serves up to 16 MB from its heap (any model load does this)
statm = Statm(__import__("os").getpid())
before = statm.anon()
tensors = [torch.ones(2 * 2**20) for _ in range(20)]  # 8 MB each, every page touched
del tensors[:-1]
print(statm.anon() - before)
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[-1])


def test_freed_tensors_go_back_to_the_os_at_once():
    """ZeRO-3 gathers and frees blocks of 1-30 MB tensors at every step; under glibc's default
    policy a worker kept what it freed (~1 W on the rehearsal's ZeRO-3 worker)."""
    assert _held_after_freeing(promptly=True) < 20 * 2**20  # the kept tensor, and change
    assert _held_after_freeing(promptly=False) > 100 * 2**20  # the default: kept by the heap
