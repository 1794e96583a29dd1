"""Checks that run before Ray starts, so a mistyped path or missing S3 credentials end in
one line within seconds, not in a worker's traceback after the cluster spun up.

Every check raises ``ValueError`` with one line; the CLI prints it and exits with 2.
"""

from __future__ import annotations

from collections.abc import Iterable

from medvl import storage


def check_inputs(inputs: dict[str, str], outputs: Iterable[str] = (), produced: Iterable[str] = ()) -> None:
    """``inputs``: name -> URI that must exist (empty URIs are not set, and are skipped, as
    are URIs under a ``produced`` prefix: an earlier pipeline step writes them). Every S3
    bucket among inputs and ``outputs`` must be reachable with the credentials at hand."""
    produced = tuple(p.rstrip("/") for p in produced if p)
    buckets = {u.split("/")[2]: u for u in [*inputs.values(), *outputs] if u and storage.is_s3(u)}
    for uri in buckets.values():
        check_bucket(uri)
    for name, uri in inputs.items():
        made = any(uri == p or uri.startswith(p + "/") for p in produced)
        if uri and not made and not storage.exists(uri):
            raise ValueError(f"{name}: {uri} does not exist")


def check_bucket(uri: str) -> None:
    """The bucket of an ``s3://`` URI answers a HEAD with the environment's credentials and
    endpoint (``AWS_ENDPOINT_URL``, as boto3 and our pyarrow filesystem both read it)."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    bucket = uri.split("/")[2]
    client = boto3.client("s3", config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 2}))
    try:
        client.head_bucket(Bucket=bucket)
    except NoCredentialsError as e:
        raise ValueError(f"{uri}: no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                         "or AWS_PROFILE, or give the nodes an instance role)") from e
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        why = {"404": "no such bucket", "NoSuchBucket": "no such bucket",
               "403": "access denied with these credentials"}.get(code, code)
        raise ValueError(f"{uri}: bucket {bucket!r}: {why}") from e
    except BotoCoreError as e:  # endpoint unreachable, bad region, ...
        raise ValueError(f"{uri}: cannot reach S3 ({client.meta.endpoint_url}): {e}") from e


SHARED_HINT = "use an s3:// URI or a directory on a mount every node shares (NFS, EFS, Lustre)"
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` leaves the cluster config on the head


def check_shared_storage(uri: str, name: str = "output") -> None:
    """On a cluster of more than one node, ``uri`` must be one storage for all of them.

    Ray Train checks this itself only when a worker uploads its first checkpoint (hours in),
    and until then every node writes its metrics, logs and shards to its own disk. So, before
    anything starts, the driver writes a marker there and a task on every alive node (pinned
    to it) reads it back, as Ray Train's validation file does. A cluster whose autoscaler can
    still start nodes (``ray up``'s config allows workers, or the only node takes no work) may
    have nothing else up yet: a local path must then also lie on a network filesystem. Needs
    Ray initialised; one node that can run work alone is not checked.
    """
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    growing = autoscaled_workers() > 0 or not any(n["Resources"].get("CPU") for n in nodes)
    if len(nodes) < 2 and not growing:
        return
    blind = nodes_not_seeing(uri, nodes)
    if blind:
        node, why = blind[0]
        raise ValueError(f"{name}: {uri} is not storage the cluster's nodes share ({len(blind)} of {len(nodes)} "
                         f"nodes, e.g. {node}, cannot read a file the driver wrote there: {why}); {SHARED_HINT}")
    if growing and not storage.is_s3(uri):
        kind = storage.mount_type(storage.resolve(uri)[1])
        if kind not in storage.NETWORK_FILESYSTEMS:
            raise ValueError(f"{name}: {uri} is on this node's own disk ({kind}) and the autoscaler starts the "
                             f"nodes that will write there; {SHARED_HINT}")


def nodes_not_seeing(uri: str, nodes: list[dict], timeout_s: float = 120) -> list[tuple[str, str]]:
    """``(node address, why)`` of the nodes on which a file the driver writes under ``uri``
    cannot be read back (a zero-CPU task pinned to each node, so busy nodes answer too)."""
    import secrets

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = secrets.token_hex(16)
    marker = storage.join(uri, f".medvl-shared-{token}")
    storage.write_text(marker, token)
    read = ray.remote(num_cpus=0, max_retries=0)(_read_back)
    try:
        refs = [read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(marker) for n in nodes]
        answers = ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as e:
        raise ValueError(f"{uri}: could not check that every node sees it (no answer in {timeout_s:.0f} s)") from e
    finally:
        storage.delete_file(marker)
    return [(f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})", answer) for n, answer in zip(nodes, answers, strict=True) if answer != token]


def _read_back(uri: str) -> str:
    """The marker's text, or why it cannot be read (runs on the node under test)."""
    try:
        return storage.read_text(uri)
    except OSError as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def autoscaled_workers() -> int:
    """How many worker nodes the autoscaler of a ``ray up`` cluster may start: its config on
    the head (the file Ray Tune reads to tell an autoscaling cluster), 0 without one."""
    import os

    import yaml

    path = os.path.expanduser(BOOTSTRAP_CONFIG)
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    types = raw.get("available_node_types", {})
    per_type = sum(t.get("max_workers", 0) for n, t in types.items() if n != raw.get("head_node_type"))
    return min(per_type, raw.get("max_workers", per_type)) if types else raw.get("max_workers", 0)
