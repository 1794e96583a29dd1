"""Each step on its node type: the placement functions, and cluster/aws.yaml on Ray's fake
multi-node autoscaler (v2) with the qilin-13b recipe."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from medvl.placement import (
    POOL_LABEL,
    Placement,
    actor_options,
    check_accelerator,
    cpu_task_options,
    train_scaling,
)
from tests import fake_cluster


def test_training_names_its_accelerator_and_packs_onto_one_node():
    s = train_scaling(8, True, 8, Placement())
    assert (s.accelerator_type, s.placement_strategy) == ("A100", "STRICT_PACK")
    assert s._resources_per_worker_not_none == {"CPU": 8, "GPU": 1, "accelerator_type:A100": 0.001}
    assert train_scaling(16, True, 8, Placement()).placement_strategy == "PACK"  # two whole nodes
    assert train_scaling(8, True, 8, Placement(train_accelerator="")).accelerator_type is None
    cpu = train_scaling(2, False, 0.5, Placement())  # the CPU demo: no accelerator asked for
    assert cpu.accelerator_type is None and cpu._resources_per_worker_not_none == {"CPU": 0.5}


def test_gpu_actors_ask_for_the_serving_accelerator_and_cpu_work_for_the_cpu_pool():
    p = Placement()
    assert actor_options(4, 1, p) == {"num_cpus": 4, "num_gpus": 1, "accelerator_type": "L40S"}
    assert actor_options(1, 0, p) == {"num_cpus": 1, "num_gpus": 0, "label_selector": p.cpu_selector}
    assert cpu_task_options(p) == {"label_selector": {POOL_LABEL: "!in(gpu-train,gpu-serve)"}}
    assert cpu_task_options(Placement(cpu_selector={})) == {}


def test_an_accelerator_no_node_can_offer_fails_at_once(ray_cluster):
    check_accelerator("")  # any GPU: nothing to check
    with pytest.raises(ValueError, match=r"no node has a A100 GPU .*GPUs here: none"):
        check_accelerator("A100")


def test_fake_config_keeps_the_real_node_types_labels_and_limits(tmp_path):
    cfg = fake_cluster.fake_config(fake_cluster.ROOT / "cluster" / "aws.yaml", 6379)
    types = cfg["available_node_types"]
    assert types[fake_cluster.HEAD_TYPE]["resources"]["CPU"] == 0  # the head takes no work
    assert {t.get("labels", {}).get(POOL_LABEL) for n, t in types.items() if n != fake_cluster.HEAD_TYPE} == {
        "cpu", "gpu-train", "gpu-serve"}
    assert types["gpu_train"]["resources"]["accelerator_type:A100"] == 1


@pytest.mark.slow
def test_each_step_lands_on_its_node_type_on_the_fake_autoscaler(tmp_path):
    """From a cold cluster, in the order the pipeline runs and faster than idle nodes go:
    training on exactly one gpu_train node while an idle gpu_serve node is up; replicas and eval
    actors on gpu_serve while an idle p4de is up; Ray Data on cpu_worker, never on the head or an
    idle GPU node; idle nodes released after idle_timeout."""
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps({"id": str(i)}) + "\n" for i in range(8)))
    cluster = fake_cluster.start(tmp_path)
    try:
        (tmp_path / "config.json").write_text(json.dumps(cluster.config))
        proc = subprocess.run([sys.executable, str(fake_cluster.Path(fake_cluster.__file__)), cluster.address,
                               str(tmp_path / "config.json"), str(records)],
                              capture_output=True, text=True, timeout=420, cwd=fake_cluster.ROOT)
    finally:
        cluster.stop()
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["known"] == ["A100", "L40S"]  # not refused before the autoscaler has added them
    assert out["replica_cold"] == ["gpu_serve"]
    assert out["train"] == ["gpu_train"] * 8 and out["train_nodes"] == 1
    assert set(out["replicas"]) == {"gpu_serve"} and len(out["replicas"]) == 2
    assert set(out["eval"]) == {"gpu_serve"} and len(out["eval"]) == 4
    assert out["cpu"] == ["cpu_worker"]
    assert "gpu_train" not in out["alive_after"] and "gpu_serve" not in out["alive_after"]
    assert out["released_s"] - out["placed_s"] < 150
