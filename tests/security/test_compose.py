"""Issue 16, Flower in docker-compose.yml: no default password, and published on loopback unless configured.

Flower can revoke tasks and shut workers down. Compose now refuses the file without FLOWER_BASIC_AUTH, and
publishes the port on 127.0.0.1 unless FLOWER_BIND says otherwise. Resolved by `docker compose config` (or
docker-compose), as tests/e2e/test_compose_processes.py does.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import REPO
from tests.e2e.test_compose_processes import compose_tool, resolved_compose

# The caller's own settings must not decide the outcome.
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}


def _flower_bindings(env: dict[str, str]) -> list[str]:
    """host_ip:published of each port Flower publishes (Compose v1 prints strings, v2 objects)."""
    ports = resolved_compose(env)["services"]["flower"]["ports"]
    bindings = []
    for port in ports:
        if isinstance(port, dict):
            bindings.append(f"{port.get('host_ip', '0.0.0.0')}:{port['published']}")
        else:
            bindings.append(":".join(str(port).split(":")[:2]))
    return bindings


def test_compose_refuses_to_start_without_a_flower_password():
    tool = compose_tool()
    if tool is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    for env in (CLEAN_ENV, CLEAN_ENV | {"FLOWER_BASIC_AUTH": ""}):
        result = subprocess.run(
            [*tool, "-f", str(REPO / "docker-compose.yml"), "config"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode != 0, result.stdout
        assert "FLOWER_BASIC_AUTH" in result.stderr


@pytest.mark.parametrize(
    ("settings", "bindings"),
    [
        pytest.param({}, ["127.0.0.1:5555"], id="default-loopback"),
        pytest.param({"FLOWER_PORT": "5600"}, ["127.0.0.1:5600"], id="other-port-still-loopback"),
        pytest.param({"FLOWER_BIND": "0.0.0.0"}, ["0.0.0.0:5555"], id="published-when-asked"),
    ],
)
def test_flower_is_bound_to_loopback_unless_configured(settings, bindings):
    env = CLEAN_ENV | {"FLOWER_BASIC_AUTH": "ops:s3cret"} | settings
    assert _flower_bindings(env) == bindings
    flower = resolved_compose(env)["services"]["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == "ops:s3cret"
