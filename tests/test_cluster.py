"""cluster/aws.yaml passes Ray's own autoscaler validation; the KubeRay manifests are complete."""

import copy
import fnmatch
import importlib.util
import subprocess
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


def _aws() -> dict:
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text())


def _load(name: str):
    """A script of cluster/ (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(name, CLUSTER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_aws_every_node_runs_ray_with_token_auth_and_a_loopback_dashboard():
    """Container-wide env (head and workers alike), the token file mounted where it points,
    no dashboard on 0.0.0.0 (tests/test_cluster_auth.py starts this head and submits jobs)."""
    raw = _aws()
    docker = raw["docker"]
    env = dict(o.split(None, 1)[1].split("=", 1) for o in docker["run_options"] if o.startswith("--env "))
    assert env.get("RAY_AUTH_MODE") == "token"
    assert env["RAY_AUTH_TOKEN_PATH"] in raw["file_mounts"]
    assert not docker.get("head_run_options") and not docker.get("worker_run_options")
    starts = [c for c in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and not any("0.0.0.0" in c for c in starts)
    assert "--dashboard-host=127.0.0.1" in starts[0]


def _rsync_excluded(path: str, patterns: list[str]) -> bool:
    """rsync's --exclude for patterns without an inner '/': a pattern matches any path
    component's name, one ending in '/' only directories (every component here but the last)."""
    parts = path.split("/")
    for i, name in enumerate(parts):
        is_dir = i < len(parts) - 1
        for pattern in patterns:
            assert "/" not in pattern.rstrip("/"), pattern
            if fnmatch.fnmatchcase(name, pattern.rstrip("/")) and (is_dir or not pattern.endswith("/")):
                return True
    return False


SECRETS = ["runs/demo/data/alignment/shards/part-0.parquet", ".venv/bin/python", ".venv-vllm/bin/python",
           ".git/config", "deploy.pem", "cluster/ssh.key", "id_rsa", "id_ed25519.pub", "demo-data/images/a.dcm"]
KEPT = ["medvl/pipeline.py", "cluster/aws.yaml", "constraints-gpu.txt", "workflows/configs/qilin-13b.yaml"]


def test_launcher_file_mounts_leave_out_runs_venvs_keys_and_git():
    raw = _aws()
    assert "." in raw["file_mounts"].values()  # the repository is what is copied...
    excluded = raw["rsync_exclude"]
    assert [p for p in SECRETS if not _rsync_excluded(p, excluded)] == []  # ...without these
    assert [p for p in KEPT if _rsync_excluded(p, excluded)] == []
    assert not any(_rsync_excluded(Path(local).name, excluded) for local in raw["file_mounts"].values())


def test_dockerfile_runs_as_non_root_and_dockerignore_keeps_secrets_out(tmp_path):
    # docker-py's implementation of .dockerignore (installed as moto's dependency)
    from docker.utils.build import exclude_paths

    users = [line.split()[1] for line in (CLUSTER / "Dockerfile").read_text().splitlines()
             if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0") and not users[-1].startswith(("root:", "0:"))
    for path in SECRETS + KEPT:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x")
    patterns = [p for p in (CLUSTER.parent / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    context = exclude_paths(str(tmp_path), patterns)
    assert sorted(p for p in SECRETS if p in context) == []
    assert sorted(KEPT) == sorted(p for p in KEPT if p in context)


def test_gpu_installs_carry_vllm_with_the_gpu_constraints():
    """Where Serve runs (the image, the AWS nodes) and in the README: `[vllm]` with
    constraints-gpu.txt, the set tests/test_install.py resolves (constraints.txt cannot)."""
    installs = [line for line in (CLUSTER / "Dockerfile").read_text().splitlines() if "pip install" in line]
    installs += [c for c in _aws()["setup_commands"] if "pip install" in c]
    readme = (CLUSTER.parent / "README.md").read_text()
    installs += [line for line in readme.split("## GPU quick start")[1].splitlines() if "pip install" in line]
    assert len(installs) == 3
    for line in installs:
        assert "-c" in line.split() and "constraints-gpu.txt" in line and "[vllm]" in line, line


def test_gpu_nodes_boot_an_ami_whose_driver_runs_cuda_13():
    """CUDA 13 torch needs driver >= 580; with no ImageId Ray fills in its default (older)
    Deep Learning AMI, and every GPU worker fails at CUDA init, after the nodes started."""
    cuda = [line for line in (CLUSTER.parent / "constraints-gpu.txt").read_text().splitlines()
            if line.startswith("nvidia-cuda-runtime==")]
    assert cuda and cuda[0].split("==")[1].startswith("13.")  # if this moves, revisit the AMI
    types = _aws()["available_node_types"]
    for name in ("gpu_train", "gpu_serve"):
        ami = types[name]["node_config"].get("ImageId", "")
        assert ami.startswith("resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu"), name


def test_training_is_one_node_unless_efa_is_configured():
    """Two p4de nodes without EFA would run ZeRO-3 over TCP: a second gpu_train node only with
    EFA interfaces and a cluster placement group."""
    train = _aws()["available_node_types"]["gpu_train"]
    node = train["node_config"]
    efa = any(i.get("InterfaceType") == "efa" for i in node.get("NetworkInterfaces", []))
    assert train["max_workers"] == 1 or (efa and node.get("Placement", {}).get("GroupName"))


def test_security_group_admits_ssh_and_serve_from_the_configured_cidr_only(s3_endpoint):
    """cluster/security_group.py, then Ray's own security-group step of `ray up`, against a
    loopback EC2 (moto): the nodes get that group, and it admits nothing from 0.0.0.0/0."""
    import boto3
    from ray.autoscaler._private.aws.config import _configure_security_group

    raw = _aws()
    rules = raw["provider"]["security_group"]["IpPermissions"]
    cidrs = {r["CidrIp"] for rule in rules for r in rule["IpRanges"]}
    assert "0.0.0.0/0" not in cidrs and {(r["FromPort"], r["ToPort"]) for r in rules} == {(22, 22), (8000, 8000)}
    group = _load("security_group").ensure_group(raw)
    ec2 = boto3.client("ec2", region_name=raw["provider"]["region"])
    vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    subnet = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"][0]["SubnetId"]
    config = copy.deepcopy(raw)
    for t in config["available_node_types"].values():
        t["node_config"]["SubnetIds"] = [subnet]  # what `ray up`'s subnet step fills in
    _configure_security_group(config)
    assert {t["node_config"]["SecurityGroupIds"][0] for t in config["available_node_types"].values()} == {group}
    (sg,) = ec2.describe_security_groups(GroupIds=[group])["SecurityGroups"]
    open_to = {(p.get("FromPort"), r["CidrIp"]) for p in sg["IpPermissions"] for r in p.get("IpRanges", [])}
    assert open_to == {(port, cidr) for port in (22, 8000) for cidr in cidrs}
    assert [p["UserIdGroupPairs"][0]["GroupId"] for p in sg["IpPermissions"] if p["IpProtocol"] == "-1"] == [group]


def test_kuberay_token_auth():
    for name, key in (("rayjob.yaml", "rayClusterSpec"), ("rayservice.yaml", "rayClusterConfig")):
        spec = yaml.safe_load((CLUSTER / "kuberay" / name).read_text())["spec"][key]
        assert spec["authOptions"] == {"mode": "token"}, name
        assert tuple(map(int, spec["rayVersion"].split(".")[:2])) >= (2, 52), name


def _docker_options(node_type: str) -> list[str]:
    """`docker run` options of a worker of this type, merged as Ray's autoscaler v2 merges them."""
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig

    docker = AutoscalingConfig(_aws(), skip_content_hash=True).get_docker_config(node_type)
    return docker["run_options"] + docker.get("worker_run_options", [])


def test_gpu_train_checkpoints_to_a_raid0_of_its_nvme_disks():
    """Ranks write each ~20 GB checkpoint to $TMPDIR before Ray uploads it: on gpu_train that is
    the instance-store RAID0, mounted on the host before docker starts and passed in; elsewhere
    the container's /tmp. GPU root disks are provisioned above gp3's 125 MB/s default."""
    types = _aws()["available_node_types"]  # the RAID itself: test_nvme_setup_...
    train = _docker_options("gpu_train")
    assert "-v /nvme:/nvme" in train and "--env TMPDIR=/nvme/tmp" in train
    assert "--env RAY_AUTH_MODE=token" in train  # the shared options are kept, not replaced
    for name in ("cpu_worker", "gpu_serve"):
        assert not any("nvme" in o.lower() for o in _docker_options(name)), name
        assert "initialization_commands" not in types[name], name
    for name in ("gpu_train", "gpu_serve"):
        (disk,) = types[name]["node_config"]["BlockDeviceMappings"]
        ebs = disk["Ebs"]
        assert ebs["VolumeType"] == "gp3" and 500 <= ebs["Throughput"] <= 1000, name
        assert ebs["Throughput"] <= ebs["Iops"] / 4 and ebs["Iops"] <= 16000, name  # gp3's limits


def _role_policies(iam, role: str) -> dict:
    inline = {p: iam.get_role_policy(RoleName=role, PolicyName=p)["PolicyDocument"]
              for p in iam.list_role_policies(RoleName=role)["PolicyNames"]}
    managed = sorted(p["PolicyArn"] for p in iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"])
    return {"inline": inline, "managed": managed}


def _statements(document: dict) -> set[tuple]:
    """(actions, resources) of each Allow statement, order-free."""
    def as_tuple(value) -> tuple:
        return tuple(sorted([value] if isinstance(value, str) else value))
    assert {s["Effect"] for s in document["Statement"]} == {"Allow"}
    return {(as_tuple(s["Action"]), as_tuple(s["Resource"])) for s in document["Statement"]}


def test_every_node_has_an_instance_profile_and_the_heads_can_launch_gpu_workers(s3_endpoint):
    """cluster/iam.py against a loopback IAM (moto): workers get S3 on the named bucket only
    (Ray gives workers no profile); the head's profile also passes the workers' role and
    reads the DLAMI's SSM parameter (RunInstances with resolve:ssm: needs it). Re-running
    changes nothing and removes a policy attached since."""
    import boto3
    from ray.autoscaler._private.aws.config import _configure_iam_role

    iam_py = _load("iam")
    raw = _aws()
    profiles = {name: t["node_config"].get("IamInstanceProfile") for name, t in raw["available_node_types"].items()}
    head = profiles.pop(raw["head_node_type"])
    assert head == {"Name": iam_py.HEAD} and set(map(str, profiles.values())) == {str({"Name": iam_py.NODE})}
    config = prepare_config(copy.deepcopy(raw))
    assert "IamInstanceProfile" not in _configure_iam_role(config).get("head_node", {})  # Ray makes none

    bucket = s3_endpoint.removeprefix("s3://")
    arns = iam_py.ensure_profiles([s3_endpoint + "/runs"])
    iam = boto3.client("iam")
    node_role = iam.get_role(RoleName=iam_py.NODE)["Role"]["Arn"]
    s3 = {(("s3:GetBucketLocation", "s3:ListBucket"), (f"arn:aws:s3:::{bucket}",)),
          (("s3:AbortMultipartUpload", "s3:DeleteObject", "s3:GetObject", "s3:PutObject"),
           (f"arn:aws:s3:::{bucket}/*",))}
    node = _role_policies(iam, iam_py.NODE)
    assert node["managed"] == [] and {k: _statements(v) for k, v in node["inline"].items()} == {"medvl-s3": s3}
    head_policies = _role_policies(iam, iam_py.HEAD)
    assert head_policies["managed"] == ["arn:aws:iam::aws:policy/AmazonEC2FullAccess"]
    assert {k: _statements(v) for k, v in head_policies["inline"].items()} == {"medvl-s3": s3, "medvl-launch": {
        (("iam:PassRole",), (node_role,)),
        (("ssm:GetParameter", "ssm:GetParameters"), ("arn:aws:ssm:*::parameter/aws/service/deeplearning/*",))}}
    for name, arn in arns.items():
        (role,) = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]["Roles"]
        assert role["RoleName"] == name and arn.endswith(f":instance-profile/{name}")

    before = {r: _role_policies(iam, r) for r in arns}
    iam.attach_role_policy(RoleName=iam_py.NODE, PolicyArn="arn:aws:iam::aws:policy/AmazonS3FullAccess")
    assert iam_py.ensure_profiles([s3_endpoint + "/runs"]) == arns
    assert {r: _role_policies(iam, r) for r in arns} == before


def _run_nvme_setup(tmp_path: Path, mounted: str) -> list[str]:
    """gpu_train's initialization command under bash, with stubs for what needs a p4de's host
    (root, block devices): the `sudo` commands it would run, one a line."""
    (init,) = _aws()["available_node_types"]["gpu_train"]["initialization_commands"]
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    disks = "".join(f"/dev/nvme{i}n1 Amazon EC2 NVMe Instance Storage\n" for i in range(1, 9))
    scripts = {"sudo": f'echo "$*" >> {tmp_path}/sudo.log',
               "mountpoint": 'case " $MOUNTED " in *" $2 "*) exit 0;; esac; exit 1',
               "lsblk": f"printf '/dev/nvme0n1 Amazon Elastic Block Store\\n{disks}'"}
    for name, body in scripts.items():
        (stubs / name).write_text(f"#!/bin/bash\n{body}\n")
        (stubs / name).chmod(0o755)
    log = tmp_path / "sudo.log"
    log.unlink(missing_ok=True)
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "MOUNTED": mounted}
    subprocess.run(["bash", "-c", init], env=env, check=True)
    return log.read_text().splitlines()


def test_nvme_setup_makes_one_raid0_of_the_instance_store_disks_once(tmp_path):
    disks = " ".join(f"/dev/nvme{i}n1" for i in range(1, 9))  # not nvme0n1: the EBS root disk
    tmp = ["mkdir -p /nvme/tmp", "chmod 1777 /nvme/tmp"]
    assert _run_nvme_setup(tmp_path, "") == [
        "mkdir -p /nvme", f"mdadm --create /dev/md/nvme --run --level=0 --raid-devices=8 {disks}",
        "mkfs.ext4 -q -F -E nodiscard /dev/md/nvme", "mount /dev/md/nvme /nvme", *tmp]
    assert _run_nvme_setup(tmp_path, "/opt/dlami/nvme") == [  # the AMI's own RAID, reused
        "mkdir -p /nvme", "mount --bind /opt/dlami/nvme /nvme", *tmp]
    assert _run_nvme_setup(tmp_path, "/nvme") == tmp  # a re-run (`ray up` again)
