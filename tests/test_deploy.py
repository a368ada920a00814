"""The Docker Compose deployment: what it runs matches what the README and .env.example say.

The structure is checked everywhere; `docker compose config` where Compose is installed; the stack
itself is built and run in tests/test_compose_stack.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO

COMPOSE = REPO / "docker-compose.yml"


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def env_example() -> set[str]:
    """The variables .env.example sets, and those it shows commented out (`#NAME=...`)."""
    return set(re.findall(r"^#?([A-Z_]+)=", (REPO / ".env.example").read_text(), re.MULTILINE))


def test_redis_persists_with_aof_behind_a_password_on_a_volume() -> None:
    redis = compose()["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--requirepass ${REDIS_PASSWORD" in command
    assert any(v.endswith(":/data") and v.split(":")[0] in compose()["volumes"] for v in redis["volumes"])
    assert all(p.startswith("127.0.0.1:") for p in redis["ports"])  # not exposed beyond the host


def test_workers_scale_and_flower_is_behind_basic_auth() -> None:
    services = compose()["services"]
    worker, flower = services["worker"], services["flower"]
    assert worker["command"][:4] == ["celery", "-A", "luminagrid", "worker"]
    assert "container_name" not in worker and "ports" not in worker  # `--scale worker=N` works
    # One Redis unless .env names the sentinels (the `ha` profile).
    assert worker["environment"]["LUMINAGRID_BROKER_URL"].startswith("${STACK_BROKER_URL:-redis://:${REDIS_PASSWORD")
    assert worker["environment"]["LUMINAGRID_BROKER_URL"].endswith("@redis:6379/0}")
    assert flower["command"][:4] == ["celery", "-A", "luminagrid", "flower"]
    # Basic auth from the environment, not the command line (which `ps` on the host shows).
    auth = flower["environment"]["FLOWER_BASIC_AUTH"]
    assert auth.startswith("${FLOWER_USER") and "${FLOWER_PASSWORD" in auth
    assert not any("basic-auth" in a or "PASSWORD" in a for a in flower["command"])
    assert flower["environment"]["LUMINAGRID_BROKER_URL"] == worker["environment"]["LUMINAGRID_BROKER_URL"]
    # Only this machine reaches Flower unless .env says otherwise.
    assert flower["ports"] == ["${FLOWER_BIND:-127.0.0.1}:${FLOWER_PORT:-5555}:5555"] and "--port=5555" in flower["command"]


def test_images_come_from_env_with_docker_hubs_defaults() -> None:
    services = compose()["services"]
    assert services["redis"]["image"] == "${REDIS_IMAGE:-redis:7}"
    for name in ("worker", "flower"):
        assert services[name]["build"]["args"]["PYTHON_IMAGE"] == "${PYTHON_IMAGE:-python:3.12-slim}"
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "ARG PYTHON_IMAGE=python:3.12-slim\nFROM ${PYTHON_IMAGE}\n" in dockerfile
    example = dict(line.split("=", 1) for line in (REPO / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert (example["PYTHON_IMAGE"], example["REDIS_IMAGE"], example["FLOWER_BIND"]) == (
        "python:3.12-slim", "redis:7", "127.0.0.1")


def test_every_variable_the_compose_file_uses_is_in_env_example_and_the_readme() -> None:
    used = set(re.findall(r"\$\{([A-Z_]+)", COMPOSE.read_text()))
    assert env_example() - used == {"COMPOSE_PROFILES"}  # Compose's own: `ha` turns the profile on
    assert used <= env_example()
    readme = (REPO / "README.md").read_text()
    for name in used:
        assert f"`{name}`" in readme, name
    assert "docker compose up -d --scale worker=" in readme and "cp .env.example .env" in readme
    assert "http://localhost:5555" in readme


def test_the_image_holds_what_pip_install_needs_and_runs_a_worker() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    copied = " ".join(line for line in dockerfile.splitlines() if line.startswith("COPY"))
    for needed in ("pyproject.toml", "README.md", "celeryconfig.py", "cli.py", "luminagrid"):
        assert needed in copied, needed
    assert 'CMD ["celery", "-A", "luminagrid", "worker"' in dockerfile
    assert "USER luminagrid" in dockerfile  # not root


@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="Docker Compose is not installed here",
)
def test_docker_compose_accepts_the_file(tmp_path: Path) -> None:
    for name in ("docker-compose.yml", "Dockerfile"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copy(REPO / ".env.example", tmp_path / ".env")
    proc = subprocess.run(["docker", "compose", "config", "--quiet"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_a_non_editable_install_ships_every_subpackage() -> None:
    """`pip install .` (the Docker image) installs only the packages pyproject.toml lists."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "luminagrid").rglob("__init__.py")}
    assert found == listed


def test_the_ha_profile_adds_a_replica_and_three_sentinels_and_the_default_stack_is_unchanged() -> None:
    services = compose()["services"]
    ha = {name for name, service in services.items() if "ha" in service.get("profiles", [])}
    assert ha == {"redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"}
    assert "--replicaof redis 6379" in " ".join(services["redis-replica"]["command"])
    for name in ("redis", "redis-replica"):  # either may be the primary after a failover
        command = " ".join(services[name]["command"])
        assert "--masterauth ${REDIS_PASSWORD" in command and "--appendonly yes" in command
    for name in ("sentinel-1", "sentinel-2", "sentinel-3"):
        script = services[name]["command"][-1]
        assert "sentinel monitor $$MASTER redis 6379 2" in script and "--sentinel" in script
    assert services["sentinel-1"]["ports"] == ["127.0.0.1:${SENTINEL_PORT:-26379}:26379"]
    env = services["worker"]["environment"]
    assert env["LUMINAGRID_BROKER_URL"].startswith("${STACK_BROKER_URL:-redis://")
    example = (REPO / ".env.example").read_text()
    assert "#STACK_BROKER_URL=sentinel://:${REDIS_PASSWORD}@sentinel-1:26379;" in example
