"""Create (or reset) the two instance profiles cluster/aws.yaml names, before ``ray up``.

Without them ``ray up`` gives the head a profile of its own making (AmazonEC2FullAccess +
AmazonS3FullAccess on every bucket) and the workers none, so:
- the workers cannot read s3:// (Ray Data tasks, training ranks, eval actors run there);
- the head's autoscaler cannot launch the GPU nodes: their ``ImageId: resolve:ssm:...``
  makes RunInstances read an SSM parameter, which needs ``ssm:GetParameters``, and launching
  a worker with a profile needs ``iam:PassRole`` on that profile's role.

This script makes both, idempotently; policies attached since are removed:
- ``medvl-node`` (every worker type): read/write on the given buckets, nothing else;
- ``medvl-head``: the same S3 access, Ray's default EC2 policy (what its autoscaler uses to
  launch and end nodes), ``iam:PassRole`` on the ``medvl-node`` role only, and reading the
  AWS Deep Learning AMI parameters.

    python cluster/iam.py --bucket my-medvl-bucket [--bucket another]

An ``s3://bucket/prefix`` argument grants the whole bucket. IAM changes reach EC2 after some
seconds: a ``ray up`` straight after the first run may be refused the profile; run it again.
Buckets encrypted with a customer KMS key also need ``kms:Decrypt``/``kms:GenerateDataKey`` on
that key, which this script does not grant.
"""

from __future__ import annotations

import argparse
import json

import boto3

NODE = "medvl-node"
HEAD = "medvl-head"
EC2_POLICY = "arn:aws:iam::aws:policy/AmazonEC2FullAccess"  # what Ray attaches by default
DLAMI_PARAMETERS = "arn:aws:ssm:*::parameter/aws/service/deeplearning/*"  # public: no account
TRUST = {"Version": "2012-10-17",
         "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"},
                        "Action": "sts:AssumeRole"}]}


def _document(*statements: dict) -> dict:
    """A policy document allowing each statement (all of them Allow: nothing is denied here)."""
    return {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", **s} for s in statements]}


def s3_policy(buckets: list[str]) -> dict:
    """List, read, write and delete (Ray Train prunes old checkpoints) in these buckets only."""
    return _document(
        {"Action": ["s3:ListBucket", "s3:GetBucketLocation"],
         "Resource": [f"arn:aws:s3:::{b}" for b in buckets]},
        {"Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"],
         "Resource": [f"arn:aws:s3:::{b}/*" for b in buckets]})


def launch_policy(node_role_arn: str) -> dict:
    """What the head's autoscaler needs beyond EC2: hand workers their profile, resolve the AMI."""
    return _document({"Action": "iam:PassRole", "Resource": node_role_arn},
                     {"Action": ["ssm:GetParameters", "ssm:GetParameter"], "Resource": DLAMI_PARAMETERS})


def _ensure_role(iam, name: str, inline: dict[str, dict], managed: list[str]) -> str:
    """The role's ARN; its policies are exactly ``inline`` (by name) and ``managed`` (ARNs)."""
    try:
        arn = iam.get_role(RoleName=name)["Role"]["Arn"]
        iam.update_assume_role_policy(RoleName=name, PolicyDocument=json.dumps(TRUST))
    except iam.exceptions.NoSuchEntityException:
        arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(TRUST))["Role"]["Arn"]
    for policy in iam.list_role_policies(RoleName=name)["PolicyNames"]:
        if policy not in inline:
            iam.delete_role_policy(RoleName=name, PolicyName=policy)
    for policy, document in inline.items():
        iam.put_role_policy(RoleName=name, PolicyName=policy, PolicyDocument=json.dumps(document))
    attached = {p["PolicyArn"] for p in iam.list_attached_role_policies(RoleName=name)["AttachedPolicies"]}
    for policy in attached - set(managed):
        iam.detach_role_policy(RoleName=name, PolicyArn=policy)
    for policy in set(managed) - attached:
        iam.attach_role_policy(RoleName=name, PolicyArn=policy)
    return arn


def _ensure_profile(iam, name: str) -> str:
    """The instance profile ``name`` holding exactly the role ``name``; its ARN."""
    try:
        profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    except iam.exceptions.NoSuchEntityException:
        profile = iam.create_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    roles = [r["RoleName"] for r in profile["Roles"]]
    for role in roles:
        if role != name:
            iam.remove_role_from_instance_profile(InstanceProfileName=name, RoleName=role)
    if name not in roles:
        iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
    return profile["Arn"]


def ensure_profiles(buckets: list[str]) -> dict[str, str]:
    """Both profiles, by name -> ARN, with exactly the policies the module docstring lists."""
    if not buckets:
        raise ValueError("name at least one bucket: the nodes get S3 access to those only")
    iam = boto3.client("iam")
    s3 = {"medvl-s3": s3_policy([b.removeprefix("s3://").split("/")[0] for b in buckets])}
    node_role = _ensure_role(iam, NODE, s3, [])
    _ensure_role(iam, HEAD, {**s3, "medvl-launch": launch_policy(node_role)}, [EC2_POLICY])
    return {name: _ensure_profile(iam, name) for name in (NODE, HEAD)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bucket", action="append", required=True,
                        help="a bucket (or s3:// URI) the cluster reads and writes; repeat for more")
    for name, arn in ensure_profiles(parser.parse_args().bucket).items():
        print(name, arn)


if __name__ == "__main__":
    main()
