"""Two things only a cluster of several nodes shows, on Ray's fake multi-node cluster (one
``ray start`` per node on this machine; ``fake_cluster.start_static``):

- each rank's feed is read on its own node (``feed/rankN.json`` records where every read
  task ran), not spread over the cluster;
- a run whose output is not one storage for every node stops before anything starts. The
  last node runs in a mount namespace of its own with an empty tmpfs over one directory: for
  it, what the driver writes there does not exist, as on a node without the driver's disk.

The drivers run in subprocesses (this process already belongs to the session's own Ray):
``python -m tests.test_multinode MODE ...``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medvl import storage
from medvl.preflight import check_shared_storage
from tests import fake_cluster

ROOT = fake_cluster.ROOT
NODES = [2, 2, 2]  # CPUs: two nodes for the two ranks, one more where SPREAD would read too


@pytest.fixture(scope="module")
def cluster(s3_endpoint, tmp_path_factory):
    """Head (no CPUs) + three 2-CPU nodes; the last cannot see ``hidden`` (started after the
    S3 fixture: every node has its endpoint and credentials)."""
    hidden = tmp_path_factory.mktemp("hidden")
    c = fake_cluster.start_static(NODES, private={len(NODES) - 1: str(hidden)})
    yield c, hidden
    c.stop()


def _driver(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.test_multinode", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_each_rank_reads_its_feed_on_its_own_node(cluster, demo_shards, demo_dir, tmp_path):
    """Two ranks on two nodes, three windows (read tasks) each: every read task of rank r ran
    on rank r's node (with Ray Data's default SPREAD, reads land on all three nodes)."""
    c, _ = cluster
    out = tmp_path / "out"
    proc = _driver("feed", c.address, str(demo_shards), str(demo_dir), str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    feeds = [json.loads((out / "feed" / f"rank{r}.json").read_text()) for r in range(2)]
    assert feeds[0]["node"] != feeds[1]["node"]
    assert all(f["rows"] == 80 for f in feeds)  # 3 windows of up to 32 steps x 1 row
    for f in feeds:
        assert f["read_nodes"] == [f["node"]], feeds


@pytest.mark.slow
def test_storage_every_node_sees_passes_and_a_node_blind_to_it_stops_the_run(cluster, tmp_path):
    """The check itself: a local directory all nodes see and an s3:// prefix pass; the
    directory one node cannot see is refused with one line naming s3:// and a shared mount."""
    c, hidden = cluster
    shared = tmp_path / "shared"
    proc = _driver("check", c.address, str(shared), "s3://medvl-test/multinode", str(hidden / "run"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    ok_local, ok_s3, refused = json.loads(proc.stdout.strip().splitlines()[-1])
    assert ok_local == ok_s3 == "ok"
    assert "1 of 4 nodes" in refused and "FileNotFoundError" in refused, refused
    assert "s3://" in refused and "shared" in refused and "\n" not in refused
    assert list(shared.iterdir()) == []  # the marker is gone


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "pipeline"])
def test_train_and_pipeline_stop_with_exit_code_2_before_starting(cluster, demo_shards, demo_dir, command):
    """The call sites: `medvl train` / `medvl pipeline` with an output one node cannot see
    stop after Ray connects, before any step or worker starts, as other preflight errors do."""
    c, hidden = cluster
    out = str(hidden / command)
    args = {"train": ["--stage", "1", "--data", str(demo_shards / "al"), "--output", out,
                      "--tokenizer", str(demo_dir / "tokenizer")],
            "pipeline": ["--config", str(ROOT / "workflows" / "configs" / "demo.yaml"), "--output", out]}[command]
    proc = subprocess.run([sys.executable, "-m", "medvl.cli", command, *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**os.environ, "RAY_ADDRESS": c.address})
    assert proc.returncode == 2, proc.stderr[-4000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"medvl {command}: error: ") and "s3://" in last, last
    assert not any(p.name.startswith("stage") or p.name == "data" for p in Path(out).iterdir())


def test_a_cluster_the_autoscaler_grows_refuses_a_local_disk_before_its_nodes_exist(
        ray_cluster, tmp_path, monkeypatch):
    """Only one node is up, but `ray up`'s config on the head (here cluster/aws.yaml, as `ray
    up` copies it) lets the autoscaler start more: a local disk is refused, s3:// passes."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(ROOT / "cluster" / "aws.yaml", home / "ray_bootstrap_config.yaml")
    monkeypatch.setenv("HOME", str(home))
    check_shared_storage("s3://medvl-test/grows")
    with pytest.raises(ValueError, match=r"own disk .*autoscaler .*s3://.*shares"):
        check_shared_storage(str(tmp_path / "run"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no autoscaler config: one node, nothing to check
    check_shared_storage(str(tmp_path / "run"))


def test_mount_type_takes_the_longest_mount_point(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("overlay / overlay rw 0 0\nfs-1.efs:/ /mnt/efs nfs4 rw 0 0\ntmpfs /mnt/efs/tmp tmpfs rw 0 0\n")
    assert storage.mount_type("/mnt/efs/runs/a", str(mounts)) == "nfs4"
    assert storage.mount_type("/mnt/efs/tmp/x", str(mounts)) == "tmpfs"
    assert storage.mount_type("/mnt/efsx", str(mounts)) == "overlay"
    assert storage.mount_type("/proc/self") == "proc"  # this machine's own table


# --- the drivers ---------------------------------------------------------------------------------
def drive_feed(address: str, shards: str, demo_dir: str, output: str) -> None:
    """Stage 1 with its two ranks on two nodes (STRICT_SPREAD: `medvl train` packs a CPU run
    onto one node), through the real loop, which writes feed/rankN.json."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from medvl.train.loop import train_loop_per_worker
    from medvl.train.trainer import feed_plan, loop_config, read_manifest
    from tests.conftest import stage1_cfg

    ray.init(address=address, log_to_driver=False)
    cfg = stage1_cfg(Path(shards), Path(demo_dir), output, "feed", batch_size=1, max_steps=80, checkpoint_every=0,
                     cpus_per_worker=1)
    manifest = read_manifest(cfg.data)
    TorchTrainer(train_loop_per_worker, train_loop_config=loop_config(cfg, feed_plan(cfg, manifest), manifest),
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1},
                                              placement_strategy="STRICT_SPREAD"),
                 run_config=RunConfig(name="feed", storage_path=output)).fit()


def drive_check(address: str, *uris: str) -> None:
    """Prints, as JSON, "ok" or the error of ``check_shared_storage`` for each URI."""
    import ray

    ray.init(address=address, log_to_driver=False)
    results = []
    for uri in uris:
        try:
            check_shared_storage(uri)
            results.append("ok")
        except ValueError as e:
            results.append(str(e))
    print(json.dumps(results))


if __name__ == "__main__":
    {"feed": drive_feed, "check": drive_check}[sys.argv[1]](*sys.argv[2:])
