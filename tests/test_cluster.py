"""cluster/aws.yaml passes Ray's own autoscaler validation; the KubeRay manifests are complete."""

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from medvl import config
from medvl.serving.api import ServeConfig

CLUSTER = Path(__file__).parents[1] / "cluster"


def test_aws_cluster_yaml_validates_with_rays_schema():
    raw = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))  # what `ray up` runs before launching
    types = raw["available_node_types"]
    workers = [t for name, t in types.items() if name != raw["head_node_type"]]
    assert all(0 == t["min_workers"] < t["max_workers"] for t in workers)  # scales from zero
    assert raw["docker"]["image"].startswith("rayproject/ray:") and "ray-ml" not in raw["docker"]["image"]
    header = (CLUSTER / "aws.yaml").read_text().split("cluster_name")[0]
    for command in ("ray up cluster/aws.yaml", "ray job submit", "workflows/pipeline.py", "ray down"):
        assert command in header


def test_aws_cluster_yaml_with_an_error_is_rejected():
    raw = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    raw["available_node_types"]["gpu_train"]["min_workers"] = "two"
    with pytest.raises(Exception, match="two"):
        validate_config(prepare_config(raw))


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"].startswith("2.")
    assert _containers(spec["headGroupSpec"])[0]["image"]
    gpus = 0
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and 0 <= group["minReplicas"] <= group["maxReplicas"]
        (c,) = _containers(group)
        assert c["image"] and c["resources"]["limits"]
        gpus += int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
    assert gpus > 0


def test_kuberay_rayjob():
    doc = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob" and doc["metadata"]["name"]
    assert "workflows/pipeline.py --config workflows/configs/qilin-13b.yaml" in doc["spec"]["entrypoint"]
    _check_cluster_spec(doc["spec"]["rayClusterSpec"])


def test_kuberay_rayservice():
    doc = yaml.safe_load((CLUSTER / "kuberay" / "rayservice.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    serve_cfg = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    (app,) = serve_cfg.applications
    assert app.import_path == "medvl.serving.app:build_app"
    assert config.from_dict(ServeConfig, app.args).model.startswith("s3://")
    _check_cluster_spec(doc["spec"]["rayClusterConfig"])
