"""cluster/aws.yaml on Ray's fake multi-node provider: every node type a local Ray node.

``start`` turns the real cluster YAML into a fake-provider config (node types, labels and
limits kept; resources filled in as AWS fills them from the instance type) and starts its head
with ``ray start --head`` in a new process session, every port explicit and its own temp dir;
``stop`` ends that session's processes and nothing else (never a cluster-wide stop).
``start_static`` starts a fixed cluster instead (a head that takes no work and one ``ray start``
node per entry, each in a session of its own); a node given a ``private`` directory runs in a
mount namespace of its own with an empty tmpfs over that directory, so it cannot see what the
other nodes write there (a node without the driver's disk). Run as a script, this module is the
driver: it places work with the pipeline's own placement functions and the qilin-13b recipe,
and prints where each request landed as JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]
# What the AWS provider writes into `resources: {}` for these instance types (CPU, GPU, accelerator).
AWS_RESOURCES = {"p4de.24xlarge": {"CPU": 96, "GPU": 8, "accelerator_type:A100": 1},
                 "g6e.2xlarge": {"CPU": 8, "GPU": 1, "accelerator_type:L40S": 1},
                 "m6i.8xlarge": {"CPU": 32}, "m6i.4xlarge": {"CPU": 16}}
PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
HEAD_TYPE = "ray.head.default"  # the name the fake provider gives its head
OBJECT_STORE = 80_000_000  # per fake node: they all share this machine's memory
IDLE_TIMEOUT_MINUTES = 0.5
# Keys the wheel's missing fake_multi_node/example.yaml would supply.
EMPTY_KEYS = {"auth": {}, "docker": {}, "initialization_commands": [], "setup_commands": [],
              "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
              "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
              "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": []}


def fake_config(aws_yaml: Path, gcs_port: int) -> dict:
    """The fake-provider config of a real cluster YAML: same node types, labels and limits."""
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

    raw = yaml.safe_load(aws_yaml.read_text())
    types = raw["available_node_types"]
    head = types.pop(raw["head_node_type"])
    for t in types.values():
        t["resources"] = {**AWS_RESOURCES[t["node_config"]["InstanceType"]], **t["resources"],
                          "object_store_memory": OBJECT_STORE}
        t["node_config"] = {}
        t.pop("initialization_commands", None)  # host setup (the NVMe RAID): no host here
        t.pop("docker", None)
    types[HEAD_TYPE] = {"resources": {**AWS_RESOURCES[head["node_config"]["InstanceType"]], **head["resources"]},
                        "labels": head.get("labels", {}), "node_config": {}, "max_workers": 0}
    provider = {"type": "external", "module": PROVIDER, "gcs_address": f"127.0.0.1:{gcs_port}",
                "launch_multiple": True, "head_node_id": FAKE_HEAD_NODE_ID,
                "disable_node_updaters": True, "disable_launch_config_check": True}
    return {"cluster_name": raw["cluster_name"], "max_workers": raw["max_workers"],
            "upscaling_speed": raw["upscaling_speed"], "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES,
            "available_node_types": types, "head_node_type": HEAD_TYPE, "provider": provider, **EMPTY_KEYS}


@dataclass
class FakeCluster:
    address: str
    config: dict
    session: int  # process group of everything `ray start` and the autoscaler launched
    temp_dir: str
    nodes: list[tuple[int, str]] = field(default_factory=list)  # (session, temp dir) per added node

    def stop(self) -> None:
        """SIGTERM, then SIGKILL what is left (raylet and GCS outlive a lone SIGTERM), of these
        sessions only, the added nodes first; then their temp dirs."""
        for session, temp in [*reversed(self.nodes), (self.session, self.temp_dir)]:
            _end_session(session)
            shutil.rmtree(temp, ignore_errors=True)


def _alive(session: int) -> bool:
    try:
        os.killpg(session, 0)
    except ProcessLookupError:
        return False
    return True


def _end_session(session: int) -> None:
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        if not _alive(session):
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(session, sig)
        deadline = time.time() + wait
        while _alive(session) and time.time() < deadline:
            time.sleep(0.2)


def _node_args(temp: str) -> list[str]:
    """Flags every fake node needs: its own temp dir and every port it opens, explicit."""
    from tests.conftest import free_port

    return ["--node-ip-address=127.0.0.1", f"--temp-dir={temp}", f"--object-store-memory={OBJECT_STORE}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


def _ray_start(args: list[str], env: dict, prefix: tuple[str, ...] = ()) -> tuple[int, str]:
    """``ray start ARGS`` in a new process session with a short temp dir of its own (Ray's
    socket paths must fit in 107 bytes): (session, temp dir). Raises with its output if it fails."""
    temp = tempfile.mkdtemp(prefix="medvl-fc-")
    cmd = [*prefix, str(Path(sys.executable).with_name("ray")), "start", *_node_args(temp), *args]
    proc = subprocess.Popen(cmd, env={**os.environ, "RAY_AUTH_MODE": "disabled", **env}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=180)
    if proc.returncode:
        _end_session(proc.pid)
        shutil.rmtree(temp, ignore_errors=True)
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    return proc.pid, temp


def _head_args(port: int) -> list[str]:
    from tests.conftest import free_port

    return ["--head", f"--port={port}", "--include-dashboard=false", f"--dashboard-port={free_port()}",
            f"--ray-client-server-port={free_port()}"]


def start(tmp: Path, aws_yaml: Path = ROOT / "cluster" / "aws.yaml") -> FakeCluster:
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

    # Imported here: this file also runs as a script, where `tests` is not importable.
    from tests.conftest import free_port

    port = free_port()
    cfg = fake_config(aws_yaml, port)
    (tmp / "cluster.yaml").write_text(yaml.safe_dump(cfg))
    env = {"RAY_FAKE_CLUSTER": "1", "RAY_enable_autoscaler_v2": "1",
           "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID, "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
           "AUTOSCALER_UPDATE_INTERVAL_S": "1", "AUTOSCALER_METRIC_PORT": str(free_port())}
    head = cfg["available_node_types"][HEAD_TYPE]["resources"]
    session, temp = _ray_start([*_head_args(port), f"--autoscaling-config={tmp / 'cluster.yaml'}",
                                f"--num-cpus={head.get('CPU', 0)}", f"--num-gpus={head.get('GPU', 0)}"], env)
    return FakeCluster(f"127.0.0.1:{port}", cfg, session, temp)


def start_static(cpus: list[float], private: dict[int, str] | None = None) -> FakeCluster:
    """A head with no CPUs (it takes no work, as on AWS) and one node per entry of ``cpus``;
    node ``i`` in ``private`` sees an empty tmpfs over ``private[i]`` (an existing directory)."""
    from tests.conftest import free_port

    port = free_port()
    session, temp = _ray_start([*_head_args(port), "--num-cpus=0"], {})
    cluster = FakeCluster(f"127.0.0.1:{port}", {}, session, temp)
    try:
        for i, n in enumerate(cpus):  # one at a time: started together on 2 busy cores, raylets timed out
            hidden = (private or {}).get(i)
            prefix = ("unshare", "--mount", "sh", "-c", 'mount -t tmpfs medvl-private "$0" && exec "$@"',
                      hidden) if hidden else ()
            cluster.nodes.append(_ray_start([f"--address={cluster.address}", f"--num-cpus={n}"], {}, prefix))
    except BaseException:
        cluster.stop()
        raise
    return cluster


# --- the driver: run as `python tests/fake_cluster.py ADDRESS CONFIG.json RECORDS.jsonl` ----------
def node_type(resources: dict, types: dict) -> str:
    """A node's type, from its CPU/GPU counts (unique per type in cluster/aws.yaml)."""
    shape = (resources.get("CPU", 0), resources.get("GPU", 0))
    (name,) = [n for n, t in types.items()
               if (t["resources"].get("CPU", 0), t["resources"].get("GPU", 0)) == shape]
    return name


def main(address: str, config_path: str, records: str) -> None:
    import ray
    from ray.util.placement_group import (
        placement_group,
        placement_group_table,
        remove_placement_group,
    )

    from medvl.data.sources import open_records, read_records
    from medvl.pipeline import load_recipe
    from medvl.placement import (
        check_accelerator,
        cpu_task_options,
        deployment_options,
        train_scaling,
    )

    types = json.loads(Path(config_path).read_text())["available_node_types"]
    r = load_recipe(str(ROOT / "workflows" / "configs" / "qilin-13b.yaml"))
    p = r.placement
    ray.init(address=address, log_to_driver=False)
    t0 = time.time()

    def where(node_ids) -> list[str]:
        kinds = {n["NodeID"]: node_type(n["Resources"], types) for n in ray.nodes() if n["Alive"]}
        return [kinds[i] for i in node_ids]

    @ray.remote
    class Probe:
        def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

    def actors(opts: dict, n: int) -> tuple[list, list[str]]:
        handles = [Probe.options(**opts).remote() for _ in range(n)]
        return handles, where(ray.get([h.node.remote() for h in handles], timeout=120))

    out: dict = {"known": []}
    for name in (p.train_accelerator, p.serve_accelerator):  # none is up yet: the autoscaler may add them
        with contextlib.suppress(ValueError):
            check_accelerator(name)
            out["known"].append(name)
    replica = deployment_options(r.deploy.num_cpus, r.deploy.num_gpus, r.deploy.min_replicas,
                                 r.deploy.max_replicas, p)["ray_actor_options"]
    handles, out["replica_cold"] = actors(replica, 1)
    for h in handles:
        ray.kill(h)  # its gpu_serve node stays up, idle

    # Stage training while an idle gpu_serve node is up: the bundles Ray Train V2 requests.
    s = r.stage1
    scaling = train_scaling(s.num_workers, s.use_gpu, s.cpus_per_worker, p)
    pg = placement_group([scaling._resources_per_worker_not_none] * scaling.num_workers,
                         strategy=scaling.placement_strategy)
    ray.get(pg.ready(), timeout=120)
    out["train"] = where(placement_group_table(pg)["bundles_to_node_id"].values())
    out["train_nodes"] = len(set(placement_group_table(pg)["bundles_to_node_id"].values()))
    remove_placement_group(pg)  # its gpu_train node stays up, idle

    # Eval actors, then Serve replicas (the pipeline's order) while an idle p4de is up.
    for key, opts, n in (("eval", deployment_options(r.eval.cpus_per_replica, 1, 1, 1, p), r.eval.replicas),
                         ("replicas", {"ray_actor_options": replica}, r.deploy.min_replicas)):
        handles, out[key] = actors(opts["ray_actor_options"], n)
        for h in handles:
            ray.kill(h)
        print(f"{key} placed at {time.time() - t0:.0f} s", file=sys.stderr, flush=True)

    # Ray Data CPU work (the preprocess reader + a map) while idle GPU nodes are up.
    opts = cpu_task_options(p)
    ds = read_records(open_records(records, str(Path(records).parent), 2), opts.get("label_selector")).map_batches(
        lambda b: {"node": [ray.get_runtime_context().get_node_id()] * len(b["line"])}, **opts)
    out["cpu"] = sorted(set(where(row["node"] for row in ds.take_all())))
    out["placed_s"] = round(time.time() - t0, 1)

    # Everything is idle now: the GPU nodes must go after idle_timeout.
    deadline = time.time() + 180
    while time.time() < deadline:
        alive = where(n["NodeID"] for n in ray.nodes() if n["Alive"])
        if "gpu_train" not in alive and "gpu_serve" not in alive:
            break
        time.sleep(2)
    out["released_s"] = round(time.time() - t0, 1)
    out["alive_after"] = sorted(where(n["NodeID"] for n in ray.nodes() if n["Alive"]))
    print(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:4])
