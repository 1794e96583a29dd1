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
