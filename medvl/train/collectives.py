"""The one place medvl calls ``torch.distributed`` itself (tests/train/test_collectives.py
checks that statically): collectives on host data inside training workers.

Why a module of its own: Ray Train makes the default process group NCCL on GPU workers, and
NCCL has no CPU backend, so a CPU tensor handed to it fails ("No backend type associated
with device type cpu") on the GPU path only, never in a CPU test where the group is gloo.
Callers here pass Python numbers, never tensors, so no call site can pick a device the group
cannot serve. Everything else collective in a worker is DeepSpeed's own (gradient
reduction, ZeRO-3 gathers in ``GatheredParameters``, the global gradient norm), on the
engine's device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_host: tuple[dist.ProcessGroup, dist.ProcessGroup] | None = None  # (default group, its host group)


def _serves_cpu(group: dist.ProcessGroup) -> bool:
    """Whether ``group`` has a backend for CPU tensors (``cpu:gloo,cuda:gloo``, not ``cuda:nccl``)."""
    return any(part.split(":")[0] == "cpu" for part in dist.get_backend_config(group).split(","))


def host_group() -> dist.ProcessGroup:
    """The process group for CPU tensors: the default one when it serves them (gloo, CPU
    workers), else a gloo group over the same ranks, made once per process and reused.

    Collective: the first call on a GPU worker creates the group, so every rank must make it
    at the same point (the worker loop calls it at start-up, where a gloo set-up failure
    costs nothing). gloo rather than the tensor on the GPU: host numbers stay on the host,
    and the path is the same one the CPU tests run.
    """
    global _host
    default = dist.group.WORLD
    if _serves_cpu(default):
        return default
    if _host is None or _host[0] is not default:
        _host = (default, dist.new_group(backend="gloo"))
    return _host[1]


def all_reduce_sum(rows: list[list[float]]) -> list[list[float]]:
    """Element-wise sum of every rank's ``rows`` (same shape on all ranks), in float64."""
    sums = torch.tensor(rows, dtype=torch.float64)
    dist.all_reduce(sums, group=host_group())
    return sums.tolist()
