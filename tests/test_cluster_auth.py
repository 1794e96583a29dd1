"""cluster/aws.yaml's head, started here as the launcher starts it: no job without the token.

The start command and environment are read from the YAML (``docker.run_options``' ``--env``
and ``head_start_ray_commands``), so the test follows the file; only what cannot exist on
this machine is replaced: the ports (free ones), the token path (the launcher's mount target
holds a token made as the YAML's header says), the launcher's autoscaling config, a temp dir.
"""

import os
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, stop_cluster

pytestmark = pytest.mark.slow  # starts a Ray head and submits jobs

REPO = Path(__file__).parents[1]
RAY = str(Path(sys.executable).parent / "ray")
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")


def head_start(config: dict) -> tuple[dict[str, str], list[str]]:
    """The head's environment (container ``--env``s, then the command's own assignments) and
    its ``ray start`` arguments, as cluster/aws.yaml gives them."""
    env = dict(opt.split(None, 1)[1].split("=", 1) for opt in config["docker"]["run_options"]
               if opt.startswith("--env "))
    (line,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    words = shlex.split(line)
    while "=" in words[0]:
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words[:2] == ["ray", "start"], line
    return env, words[2:]


def local_args(args: list[str], temp: str, dashboard: int) -> list[str]:
    """The YAML's flags with this machine's ports and temp dir; everything else as written."""
    ours = {"--port": free_port(), "--object-manager-port": free_port()}
    kept = [a for a in args if a.split("=")[0] not in (*ours, "--autoscaling-config")]
    agents = [f"--{name}={free_port()}" for name in (
        "node-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port")]
    return [*kept, *(f"{k}={v}" for k, v in ours.items()), *agents, f"--dashboard-port={dashboard}",
            f"--temp-dir={temp}", "--num-cpus=1", "--disable-usage-stats"]


@pytest.fixture(scope="module")
def aws_head():
    """(dashboard URL, token): a head started with aws.yaml's command and environment."""
    config = yaml.safe_load((REPO / "cluster/aws.yaml").read_text())
    env, args = head_start(config)
    temp = tempfile.mkdtemp(prefix="rauth")  # short: Ray's socket paths must stay under 107 bytes
    token = Path(temp) / "token"
    token.write_text(secrets.token_hex(32) + "\n")  # as aws.yaml's header makes it (print: a newline)
    if "RAY_AUTH_TOKEN_PATH" in env:  # the launcher's mount target, here
        env["RAY_AUTH_TOKEN_PATH"] = str(token)
    dashboard = free_port()
    base = clean_env(temp)
    start = subprocess.run([RAY, "start", *local_args(args, temp, dashboard)], env={**base, **env},
                           capture_output=True, text=True, timeout=180)
    try:
        assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-2000:]
        yield f"http://127.0.0.1:{dashboard}", token.read_text().strip(), temp
    finally:
        stop_cluster(temp)


def clean_env(home: str) -> dict[str, str]:
    """This process's environment without Ray auth settings, HOME elsewhere: a token in this
    machine's ~/.ray/auth_token must not turn auth on for a head or a client."""
    return {**{k: v for k, v in os.environ.items() if k not in AUTH_VARS}, "HOME": home}


def submit(address: str, home: str, env: dict[str, str], marker: str) -> subprocess.CompletedProcess:
    base = clean_env(home)
    for _ in range(30):  # the head's job agent registers a few seconds after `ray start`
        proc = subprocess.run([RAY, "job", "submit", f"--address={address}", "--",
                               sys.executable, "-c", f"print({marker!r})"],
                              env={**base, **env}, capture_output=True, text=True, timeout=300)
        if "No available agent" not in proc.stdout + proc.stderr:
            return proc
        time.sleep(2)
    return proc


def test_job_submit_needs_the_clusters_token(aws_head):
    address, token, home = aws_head
    for who, env in (("no token (Makefile/conftest's local default)", {"RAY_AUTH_MODE": "disabled"}),
                     ("no token, mode unset", {}),
                     ("a wrong token", {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)})):
        refused = submit(address, home, env, "anonymous job ran")
        out = refused.stdout + refused.stderr
        assert refused.returncode != 0 and "anonymous job ran" not in out, f"{who}: {out[-2000:]}"
        assert "401" in out or "uthenticat" in out or "token" in out.lower(), f"{who}: {out[-2000:]}"
    # README's form (a client sends the token only in token mode)
    accepted = submit(address, home, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}, "authenticated job ran")
    assert accepted.returncode == 0, accepted.stdout[-2000:] + accepted.stderr[-2000:]
    assert "authenticated job ran" in accepted.stdout and "succeeded" in accepted.stdout
