"""The Docker Compose deployment, run for real: built, started, killed and restarted.

The stack is the unchanged `docker-compose.yml` and `Dockerfile`, brought up under a project name
of its own with two workers; the host submits over the published Redis port, as the README says.
Needs a Docker engine and Compose v2; elsewhere it skips (and under CI=true it fails), saying why.
Base images come from PYTHON_IMAGE / REDIS_IMAGE (Docker Hub's by default; `.ci/run` makes local
ones with `deploy/base-images.sh` when Docker Hub does not answer).

    pytest -m compose -s      # only this, with its timings
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import kombu.exceptions
import numpy as np
import pytest
import redis
from conftest import CLI, REPO, synthetic, wait_for
from test_operations import OPENCV

import luminagrid
from luminagrid import ops
from luminagrid.app import app, use_broker
from luminagrid.local import free_port

pytestmark = pytest.mark.compose

TIMEOUT_S = 120
MASTER = "luminagrid"
#: Big enough that a job is still running when a worker is killed or Redis restarts (~3 s of work).
BUSY_IMAGE = (1600, 2400, 3)
BUSY_JOB = {"op": "denoise", "params": {"h": 10}, "strips": 8, "codec": "lossless"}


def _docker_ready() -> str | None:
    """None if Docker and Compose v2 answer, else why not."""
    for command, what in ((["docker", "info"], "no Docker engine answers"),
                          (["docker", "compose", "version"], "no Docker Compose v2 (`docker compose`)")):
        try:
            if subprocess.run(command, capture_output=True, timeout=30).returncode != 0:
                return what
        except (OSError, subprocess.TimeoutExpired):
            return what
    return None


def _image_ready(name: str) -> bool:
    if subprocess.run(["docker", "image", "inspect", name], capture_output=True).returncode == 0:
        return True
    try:
        return subprocess.run(["docker", "pull", "-q", name], capture_output=True, timeout=90).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@dataclass
class Stack:
    """One compose project: its name, env file, ports and credentials; timings as they are measured."""

    project: str
    env_file: Path
    redis_url: str
    flower_url: str
    flower_auth: tuple[str, str]
    sentinel_master: str | None = None
    timings_s: dict[str, float] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """The environment of a host process (`cli.py`) that talks to this stack."""
        env = {k: v for k, v in os.environ.items() if k not in ("LUMINAGRID_RESULT_BACKEND", "LUMINAGRID_SENTINEL_MASTER")}
        env["LUMINAGRID_BROKER_URL"] = self.redis_url
        if self.sentinel_master:
            env["LUMINAGRID_SENTINEL_MASTER"] = self.sentinel_master
        return env

    def use(self) -> None:
        """Point this process's client at the stack."""
        use_broker(self.redis_url, master=self.sentinel_master)

    def compose(self, *args: str, timeout_s: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = ["docker", "compose", "-p", self.project, "--env-file", str(self.env_file), *args]
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
        if check and proc.returncode != 0:
            pytest.fail(f"{' '.join(command)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def timed(self, what: str, *args: str) -> None:
        started = time.monotonic()
        self.compose(*args)
        self.timings_s[what] = time.monotonic() - started

    def workers(self) -> dict[str, str]:
        """Worker containers: their hostname (as in Celery's node names) -> container id."""
        ids = self.compose("ps", "-q", "worker").stdout.split()
        if not ids:
            return {}
        out = subprocess.run(["docker", "inspect", "-f", "{{.Config.Hostname}} {{.Id}}", *ids],
                             capture_output=True, text=True, check=True).stdout
        return dict(line.split() for line in out.splitlines())

    def answering(self) -> set[str]:
        """Hostnames of the workers answering a ping (none while this client reconnects to Redis)."""
        try:
            replies = app.control.inspect(timeout=1.0).ping() or {}
        except (OSError, redis.RedisError, kombu.exceptions.OperationalError) as exc:
            print(f"ping: {exc!r}", file=sys.stderr)
            return set()
        return {name.split("@", 1)[1].split("[")[0] for name in replies}

    def flower(self, path: str, auth: bool = True) -> tuple[int, bytes]:
        request = urllib.request.Request(self.flower_url + path)
        if auth:
            request.add_header("Authorization", "Basic " + b64encode(":".join(self.flower_auth).encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def logs(self, service: str) -> str:
        return self.compose("logs", "--no-color", "--no-log-prefix", service).stdout


@contextlib.contextmanager
def bring_up(request: pytest.FixtureRequest, factory: pytest.TempPathFactory, ha: bool = False) -> Iterator[Stack]:
    """The compose stack with 2 workers under a project name of its own (with `ha`: its replica and
    sentinels too, the workers following the sentinels); `down -v` and its timings printed at the end."""
    why = _docker_ready()
    images = {name: os.environ.get(name, default)
              for name, default in (("PYTHON_IMAGE", "python:3.12-slim"), ("REDIS_IMAGE", "redis:7"))}
    if why is None:
        missing = [image for image in images.values() if not _image_ready(image)]
        if missing:
            why = (f"base images {', '.join(missing)} cannot be pulled: make local ones with "
                   "`sudo deploy/base-images.sh` and set PYTHON_IMAGE / REDIS_IMAGE")
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the deployment test must run in CI, but {why}")
        pytest.skip(why)

    env_file = factory.mktemp("compose") / "test.env"
    redis_password, flower_password = secrets.token_hex(12), secrets.token_hex(12)
    redis_port, flower_port, sentinel_port = free_port(), free_port(), free_port()
    settings = {
        "REDIS_PASSWORD": redis_password, "FLOWER_USER": "operator", "FLOWER_PASSWORD": flower_password,
        "FLOWER_BIND": "127.0.0.1", "FLOWER_PORT": flower_port, "REDIS_PORT": redis_port,
        "SENTINEL_PORT": sentinel_port, **images,
    }
    redis_url = f"redis://:{redis_password}@127.0.0.1:{redis_port}/0"
    if ha:
        settings |= {"COMPOSE_PROFILES": "ha", "SENTINEL_MASTER": MASTER, "STACK_BROKER_URL": ";".join(
            f"sentinel://:{redis_password}@sentinel-{i}:26379" for i in (1, 2, 3))}
        # The host asks the published sentinel; it answers with the primary's container address,
        # which a Linux host reaches on the compose network's bridge.
        redis_url = f"sentinel://:{redis_password}@127.0.0.1:{sentinel_port}/0"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    s = Stack(
        project=f"luminagrid-test{'-ha' if ha else ''}-{os.getpid()}",
        env_file=env_file,
        redis_url=redis_url,
        flower_url=f"http://127.0.0.1:{flower_port}",
        flower_auth=("operator", flower_password),
        sentinel_master=MASTER if ha else None,
    )
    previous = app.conf.broker_url
    try:
        s.timed("build", "build")
        s.timed("up -d --scale worker=2", "up", "-d", "--scale", "worker=2")
        s.use()
        started = time.monotonic()
        wait_for(lambda: len(s.answering()) == 2, 90, "both worker containers to answer a ping", poll_s=0.5)
        s.timings_s["workers ready after up"] = time.monotonic() - started
        yield s
    finally:
        try:
            started = time.monotonic()
            s.compose("down", "-v", "--remove-orphans", "-t", "10", check=False)
            s.timings_s["down -v"] = time.monotonic() - started
        finally:
            use_broker(previous)
            line = f"compose stack{' (ha)' if ha else ''} timings: " + ", ".join(
                f"{what} {t:.1f} s" for what, t in s.timings_s.items())
            capture = request.config.pluginmanager.getplugin("capturemanager")
            with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
                print("\n" + line, flush=True)


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with bring_up(request, tmp_path_factory) as s:
        yield s


def _reference(image: np.ndarray) -> np.ndarray:
    return OPENCV[BUSY_JOB["op"]](image, ops.get(BUSY_JOB["op"]).values(BUSY_JOB["params"]))


def _running_on(job: luminagrid.Job, hosts: set[str]) -> str | None:
    """The hostname of a worker container that is computing one of the job's strips, if any."""
    for place in job.status().places:
        if place.running and place.worker:
            host = place.worker.split("@", 1)[-1].split("[")[0]
            if host in hosts:
                return host
    return None


def test_a_job_from_the_host_is_exact(stack: Stack, tmp_path: Path) -> None:
    image = synthetic(7, 900, 1200, 3)
    cv2.imwrite(str(tmp_path / "photo.png"), image)
    env = stack.env()
    started = time.monotonic()
    proc = subprocess.run([*CLI, "submit", str(tmp_path / "photo.png"), "--op", "bilateral", "--codec", "lossless",
                           "--strips", "6", "-o", str(tmp_path / "out.png")],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    stack.timings_s["a 1200x900 bilateral job from the host"] = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    out = cv2.imread(str(tmp_path / "out.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(out, OPENCV["bilateral"](image, ops.get("bilateral").values({})))


def test_docker_kill_of_a_worker_mid_job_still_gives_the_exact_output_within_seconds(stack: Stack) -> None:
    image = synthetic(8, *BUSY_IMAGE)
    expected = _reference(image)
    containers = stack.workers()
    assert len(containers) == 2
    job = luminagrid.submit(image, **BUSY_JOB)
    victim = wait_for(lambda: _running_on(job, set(containers)), 60, "a strip running in a worker container")
    subprocess.run(["docker", "kill", containers[victim]], check=True, capture_output=True)
    killed = time.monotonic()
    result = job.wait(TIMEOUT_S)
    stack.timings_s["docker kill of a worker mid-job -> job done"] = time.monotonic() - killed
    assert np.array_equal(result.image, expected)
    # Done by the cluster's supervisor, not by kombu's visibility timeout (an hour).
    assert time.monotonic() - killed < 60
    # Bring the killed worker back for the tests that follow.
    subprocess.run(["docker", "start", containers[victim]], check=True, capture_output=True)
    wait_for(lambda: len(stack.answering()) == 2, 90, "the killed worker to answer again", poll_s=0.5)


def test_compose_restart_of_redis_mid_job_still_gives_the_exact_output(stack: Stack) -> None:
    image = synthetic(9, *BUSY_IMAGE)
    expected = _reference(image)
    job = luminagrid.submit(image, **BUSY_JOB)
    wait_for(lambda: _running_on(job, set(stack.workers())), 60, "a strip running in a worker container")
    started = time.monotonic()
    stack.compose("restart", "redis")
    stack.timings_s["compose restart redis"] = time.monotonic() - started
    result = job.wait(TIMEOUT_S)
    stack.timings_s["redis back -> job done"] = time.monotonic() - started - stack.timings_s["compose restart redis"]
    assert np.array_equal(result.image, expected)
    wait_for(lambda: len(stack.answering()) == 2, 60, "both workers to answer after the Redis restart", poll_s=0.5)


def test_flower_answers_401_without_its_credentials_and_lists_both_workers_with_them(stack: Stack) -> None:
    assert stack.flower("/api/workers", auth=False)[0] == 401
    hosts = set(stack.workers())

    def both_listed() -> bool:
        code, body = stack.flower("/api/workers?refresh=1")
        assert code == 200, body[:200]
        return all(host in body.decode() for host in hosts)

    # The first refresh after the Redis restart of the test before reaches every worker.
    before = stack.logs("flower")
    assert both_listed()
    after = stack.logs("flower")[len(before):]
    assert "Inspect method" not in after, after  # e.g. "Inspect method stats failed" (a broken pipe)
    assert stack.flower("/api/tasks?limit=5")[0] == 200


def test_worker_logs_have_no_tracebacks_and_no_result_bytes(stack: Stack) -> None:
    logs = stack.logs("worker")
    assert "succeeded" in logs  # the log is the one the jobs above wrote
    assert "Traceback" not in logs, logs[logs.index("Traceback") - 2000:][:4000]
    long_lines = [line for line in logs.splitlines() if len(line) > 300]
    assert not long_lines, long_lines[0][:400]
    assert not re.search(r"[0-9a-f]{64}|[A-Za-z0-9+/=]{64}|(\\x[0-9a-f]{2}){8}", logs)  # no payload bytes
    # Each strip's line says what it did (tasks.summary).
    assert re.search(r"succeeded in [\d.]+s: job [0-9a-f]{8} denoise strip \d+/8 rows \d+-\d+: [\d.]+ s, ", logs)
    assert "Traceback" not in stack.logs("flower")
    print(logs[-2000:], file=sys.stderr)
