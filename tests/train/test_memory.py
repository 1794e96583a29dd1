"""The per-phase memory record of a training worker (``medvl.train.memory``)."""

import json
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
