"""Which nodes each kind of work asks for: the one place training, Ray Data, eval and Serve read.

Placement must not depend on what happens to be up when a step starts. On an autoscaling
cluster the steps follow each other faster than idle nodes are released, so a request for
"8 GPUs" lands on whatever GPU node is still idle (a Serve replica on an 8-GPU training node,
a training run split 7 + 1 across node types). Each request therefore names its accelerator
(Ray's ``accelerator_type:X`` resource, present only on nodes of that type), training packs
strictly onto one node when it fits, and CPU-only work stays off GPU nodes through a label
selector. The defaults match ``cluster/aws.yaml``'s node types and labels; on a machine without
labels the CPU selector matches every node, and the accelerator names only matter when a step
uses GPUs (set them to ``""`` to accept any GPU, e.g. on one local 8-GPU node).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

POOL_LABEL = "medvl.io/pool"  # the label cluster/aws.yaml gives every worker node type


@dataclass
class Placement:
    """A recipe's ``placement:`` section (defaults: cluster/aws.yaml)."""

    train_accelerator: str = field(default="A100", metadata={
        "help": "accelerator of the training nodes (gpu_train, p4de.24xlarge); '' = any GPU"})
    train_node_gpus: int = field(default=8, metadata={
        "help": "GPUs per training node: runs this size or smaller are packed onto one node"})
    serve_accelerator: str = field(default="L40S", metadata={
        "help": "accelerator of Serve replicas and eval actors (gpu_serve, g6e.2xlarge); '' = any GPU"})
    cpu_selector: dict[str, str] = field(default_factory=lambda: {POOL_LABEL: "!in(gpu-train,gpu-serve)"},
                                         metadata={"help": "Ray label selector for CPU-only work "
                                                           "(preprocessing, CPU replicas); {} = any node"})


def train_scaling(num_workers: int, use_gpu: bool, cpus_per_worker: float, p: Placement):
    """Ray Train's ``ScalingConfig``: one node type, packed onto one node when the run fits."""
    from ray.train import ScalingConfig

    pack = "STRICT_PACK" if not use_gpu or num_workers <= p.train_node_gpus else "PACK"
    return ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                         resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
                         accelerator_type=(p.train_accelerator or None) if use_gpu else None,
                         placement_strategy=pack)


def actor_options(num_cpus: float, num_gpus: float, p: Placement) -> dict[str, Any]:
    """Ray actor options of a Serve replica or an eval model actor: GPU ones on the serving
    node type, CPU ones in the CPU pool."""
    opts: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if num_gpus and p.serve_accelerator:
        opts["accelerator_type"] = p.serve_accelerator
    elif not num_gpus and p.cpu_selector:
        opts["label_selector"] = dict(p.cpu_selector)
    return opts


def cpu_task_options(p: Placement) -> dict[str, Any]:
    """Ray remote options for CPU-only Ray Data tasks (reading, decoding, tokenising, writing)."""
    return {"label_selector": dict(p.cpu_selector)} if p.cpu_selector else {}


def deployment_options(num_cpus: float, num_gpus: float, min_replicas: int, max_replicas: int,
                       p: Placement) -> dict[str, Any]:
    """Serve deployment options: replicas placed as above, autoscaled between the bounds."""
    return {"ray_actor_options": actor_options(num_cpus, num_gpus, p),
            "autoscaling_config": {"min_replicas": min_replicas, "max_replicas": max_replicas,
                                   "target_ongoing_requests": 8}}


def front_options(min_replicas: int, max_replicas: int, p: Placement) -> dict[str, Any]:
    """The Serve HTTP front (keys, limits, image decoding; no weights): small CPU replicas in
    the CPU pool, as many as the model's, each holding more requests than a model replica."""
    return {"ray_actor_options": actor_options(0.25, 0, p),
            "autoscaling_config": {"min_replicas": min_replicas, "max_replicas": max_replicas,
                                   "target_ongoing_requests": 64}}


def check_accelerator(name: str) -> None:
    """Fail in seconds rather than wait forever: a request for an accelerator that no node has
    and that no autoscaler could add (e.g. the default A100 on one local H100 machine)."""
    if not name:
        return
    import ray

    key = f"accelerator_type:{name}"
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if any(key in n["Resources"] for n in nodes) or _autoscaler_may_add(key):
        return
    have = sorted({k.split(":", 1)[1] for n in nodes for k in n["Resources"] if k.startswith("accelerator_type:")})
    raise ValueError(f"no node has a {name} GPU and the autoscaler cannot add one (GPUs here: "
                     f"{', '.join(have) or 'none'}); set the recipe's `placement:` accelerator to one of "
                     "them, or to \"\" for any GPU")


def _autoscaler_may_add(key: str) -> bool:
    """Whether an autoscaler could add a node with resource ``key``. Where the cluster config is
    published (KubeRay) that is exact; otherwise Ray 2.60 tells a driver only whether an
    autoscaler runs: v2 reports its state, v1 names nodes by their config's node types (a
    cluster without one shows ``node_<id>``)."""
    import json

    import ray
    from ray._private.state import state
    from ray.autoscaler.v2.sdk import get_cluster_status
    from ray.experimental.internal_kv import _internal_kv_get

    limits = state.get_max_resources_from_cluster_config()
    if limits:
        return bool(limits.get(key))
    if get_cluster_status(ray.get_runtime_context().gcs_address).stats.autoscaler_version not in (None, "", "0"):
        return True
    report = json.loads(_internal_kv_get("__autoscaling_status") or "{}").get("autoscaler_report") or {}
    types = {**(report.get("active_nodes") or {}), **(report.get("idle_nodes") or {})}
    return any(not t.startswith("node_") for t in types)


# Modules a serving backend needs beyond medvl's own dependencies (which training needs too).
BACKEND_MODULES = {"vllm": ("vllm", "ray.serve.llm")}
# A GPU serve node may have to be started by the autoscaler first (instance + image pull).
BACKEND_CHECK_TIMEOUT_S = 1800


def _import_errors(modules: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """On a node: this node's IP and, per module that does not import, its error (one line)."""
    import importlib

    import ray

    errors = {}
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any import failure makes the deploy fail too
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return ray.util.get_node_ip_address(), errors


def check_serve_backend(backend: str, num_cpus: float, num_gpus: float, p: Placement) -> None:
    """Before training: the serving backend imports on a node of the serve placement (where
    the deploy step's replicas will run), so a missing vLLM ends the run now, not after hours
    of training. Runs one Ray task with the replicas' own placement options: on an autoscaling
    cluster that starts a serve node for a few minutes (released when idle), and it is the
    image of that node type, not the head's, that must carry the backend."""
    modules = BACKEND_MODULES.get(backend, ())
    if not modules:
        return
    import ray

    if num_gpus:
        check_accelerator(p.serve_accelerator)
    ref = ray.remote(_import_errors).options(**actor_options(num_cpus, num_gpus, p)).remote(modules)
    try:
        node, errors = ray.get(ref, timeout=BACKEND_CHECK_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError as e:
        ray.cancel(ref, force=True)
        raise ValueError(f"deploy: no serve node took the backend check within {BACKEND_CHECK_TIMEOUT_S} s "
                         f"(placement.serve_accelerator {p.serve_accelerator!r})") from e
    if errors:
        name, why = next(iter(errors.items()))
        raise ValueError(f"deploy: backend: {backend} needs {', '.join(modules)} on the serve nodes, but "
                         f"{name} does not import on {node} ({why}); install medvl[{backend}] with "
                         f"-c constraints-gpu.txt there (cluster/Dockerfile), or serve with backend: medvl")
