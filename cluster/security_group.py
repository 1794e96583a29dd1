"""Create (or reset) cluster/aws.yaml's security group before ``ray up``, with only its rules.

When ``ray up`` finds no group named ``provider.security_group.GroupName`` in the VPC, it
creates one and adds, besides the YAML's ``IpPermissions``, SSH from 0.0.0.0/0. A group that
exists and has rules is used as found. So this script makes the group first: all traffic
between the cluster's own nodes, and the YAML's ``IpPermissions`` (SSH and the Serve port
from the CIDR written there), nothing else; rules added since are removed.

    python cluster/security_group.py [--config cluster/aws.yaml] [--vpc-id vpc-...]

The VPC defaults to the region's default VPC, the one ``ray up`` picks its subnets from.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import boto3
import yaml

CONFIG = Path(__file__).with_name("aws.yaml")


def _default_vpc(ec2) -> str:
    vpcs = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
    if not vpcs:
        raise SystemExit("no default VPC in this region: pass --vpc-id")
    return vpcs[0]["VpcId"]


def ensure_group(config: dict, vpc_id: str | None = None) -> str:
    """The group's id, its inbound rules exactly: its own members, then the YAML's rules."""
    provider = config["provider"]
    spec = provider["security_group"]
    ec2 = boto3.client("ec2", region_name=provider["region"])
    vpc_id = vpc_id or _default_vpc(ec2)
    found = ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": [spec["GroupName"]]},
                                                  {"Name": "vpc-id", "Values": [vpc_id]}])["SecurityGroups"]
    if found:
        group_id = found[0]["GroupId"]
        if found[0]["IpPermissions"]:
            ec2.revoke_security_group_ingress(GroupId=group_id, IpPermissions=found[0]["IpPermissions"])
    else:
        group_id = ec2.create_security_group(GroupName=spec["GroupName"], VpcId=vpc_id,
                                             Description=f"Ray cluster {config['cluster_name']}")["GroupId"]
    own = {"IpProtocol": "-1", "FromPort": -1, "ToPort": -1, "UserIdGroupPairs": [{"GroupId": group_id}]}
    ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=[own, *spec["IpPermissions"]])
    return group_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=CONFIG, help="the cluster YAML")
    parser.add_argument("--vpc-id", help="VPC of the cluster's subnets (default: the region's default VPC)")
    args = parser.parse_args()
    print(ensure_group(yaml.safe_load(args.config.read_text()), args.vpc_id))


if __name__ == "__main__":
    main()
