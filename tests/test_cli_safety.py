"""Safe by default, one line per error: Flower's login and Redis's AOF in `cli.py cluster`,
`result` never overwriting nor trusting its record blindly, bad settings, float TIFFs, colour
into gray-only formats."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import CLI, REPO, cli_cluster, processes_with, synthetic, wait_for

from luminagrid import broker
from luminagrid import record as records
from luminagrid.local import LocalCluster, free_port

RUN_TIMEOUT_S = 120


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def no_redis_env(**extra: str) -> dict[str, str]:
    """A configured Redis that does not answer: what fails before needing it says so first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUMINAGRID_")}
    return {**env, "LUMINAGRID_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0", **extra}


def one_line_error(proc: subprocess.CompletedProcess[str], *parts: str) -> None:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    for part in parts:
        assert part in proc.stderr


# --- cluster: Flower's login, Redis's AOF ---------------------------------------------------------


def http_status(url: str, auth: str | None) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_cluster_makes_a_flower_login_prints_it_and_runs_redis_with_aof() -> None:
    port = free_port()
    with cli_cluster(1, port) as run:
        login = next(line for line in run.banner if line.startswith("Flower login:"))
        user = login.split("user ", 1)[1].split(",", 1)[0]
        password = login.split("password ", 1)[1].split()[0]
        assert user == "luminagrid" and len(password) >= 16, login
        api = f"http://127.0.0.1:{port}/api/workers"
        assert http_status(api, None) == 401
        assert http_status(api, f"{user}:wrong-{password}") == 401
        assert http_status(api, f"{user}:{password}") == 200
        assert http_status(f"http://127.0.0.1:{port}/healthcheck", None) == 200
        # Its password is in no process's command line (which every local user can read).
        for pid in processes_with(run.marker):
            with contextlib.suppress(OSError):
                assert password.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        db = broker.client(run.url)
        assert db.config_get("appendonly") == {"appendonly": "yes"}
        assert Path(db.config_get("dir")["dir"], "appendonly.aof").exists()
        run.stop()
    assert run.proc.returncode == 0, run.err
    assert "stopping" in run.out and processes_with(run.marker) == []


@pytest.mark.parametrize("auth", ["admin", "admin:", ":secret", "admin:a,b"])
def test_a_malformed_flower_auth_is_refused_without_echoing_the_password(auth: str) -> None:
    proc = run(["cluster", "--flower-auth", auth], no_redis_env())
    one_line_error(proc, "is not USER:PASSWORD", "--flower-auth admin:SECRET")
    if ":" in auth and auth.split(":", 1)[1]:
        assert auth.split(":", 1)[1] not in proc.stderr


# --- result: its record, and existing files -------------------------------------------------------


@pytest.fixture
def detached(cluster_env: dict[str, str], tmp_path: Path) -> tuple[str, Path, np.ndarray]:
    """A finished detached job: (its id, its recorded output, the expected output)."""
    path = tmp_path / "photo.png"
    image = synthetic(95, 90, 70)
    cv2.imwrite(str(path), image)
    proc = run(["submit", str(path), "--detach", "--codec", "lossless"], cluster_env)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.split()[1]
    wait_for(lambda: "done" in run(["status", job_id], cluster_env).stdout, 60, "the job to finish", poll_s=0.2)
    return job_id, tmp_path / "photo.edges.png", cv2.Canny(image, 100, 200)


def test_result_refuses_to_overwrite_a_file_without_force(
    cluster_env: dict[str, str], detached: tuple[str, Path, np.ndarray],
) -> None:
    job_id, out, expected = detached
    out.write_bytes(b"precious")
    proc = run(["result", job_id], cluster_env)
    one_line_error(proc, f"{out} exists already", "--force")
    assert out.read_bytes() == b"precious"
    other = out.with_name("other.png")
    other.write_bytes(b"also precious")
    one_line_error(run(["result", job_id, "-o", str(other)], cluster_env), f"{other} exists already")
    assert other.read_bytes() == b"also precious"
    # The job stayed collectable; --force writes it.
    forced = run(["result", job_id, "--force"], cluster_env)
    assert forced.returncode == 0, forced.stderr
    assert np.array_equal(cv2.imread(str(out), cv2.IMREAD_UNCHANGED), expected)
    assert sorted(p.name for p in out.parent.iterdir()) == ["other.png", "photo.edges.png", "photo.png"]


def test_result_refuses_a_gray_only_format_for_a_colour_job_before_waiting(
    cluster_env: dict[str, str], tmp_path: Path,
) -> None:
    path = tmp_path / "colour.png"
    cv2.imwrite(str(path), synthetic(96, 60, 50, channels=3))
    job_id = run(["submit", str(path), "--detach", "--op", "gaussian"], cluster_env).stdout.split()[1]
    proc = run(["result", job_id, "-o", str(tmp_path / "x.pgm"), "--timeout", "30"], cluster_env)
    one_line_error(proc, ".pgm holds gray images only", "use .png or .tif")
    assert not (tmp_path / "x.pgm").exists()
    assert run(["result", job_id], cluster_env).returncode == 0  # still collectable


def forged(cluster: LocalCluster, template: dict[str, Any], change: dict[str, Any] | None, raw: str | None = None) -> str:
    """A record under a new job id: `template` with `change` (None values: keys dropped), or `raw`."""
    job_id = f"forged-{uuid.uuid4()}"
    data = {**template, "id": job_id, **(change or {})}
    data = {k: v for k, v in data.items() if v is not None}
    broker.client(cluster.url).set(records.key(job_id), raw if raw is not None else json.dumps(data), ex=300)
    return job_id


@pytest.mark.parametrize(
    ("change", "raw", "message"),
    [
        ({"output": 3}, None, "field 'output' = 3 is not a file path"),
        ({"output": ["/tmp/a.png"]}, None, "field 'output' = ['/tmp/a.png'] is not a file path"),
        ({"output": "relative.png"}, None, "recorded output path 'relative.png' is not absolute"),
        ({"output": "/tmp/lg-forged/photo.jpg"}, None, "output format '.jpg' is not lossless"),
        ({"submitted_at": None}, None, "field 'submitted_at' = None is not a time"),
        ({"submitted_at": "yesterday"}, None, "field 'submitted_at' = 'yesterday' is not a time"),
        ({"width": "big"}, None, "field 'width' = 'big' is not a whole number"),
        ({"state": "hacked"}, None, "field 'state' = 'hacked' is not one of publishing, running, cancelled"),
        (None, "not json {", "it is not JSON"),
        (None, "[1, 2]", "it is a JSON list, not an object"),
    ],
)
def test_a_malformed_record_is_one_clear_line(
    cluster: LocalCluster, cluster_env: dict[str, str], detached: tuple[str, Path, np.ndarray],
    change: dict[str, Any] | None, raw: str | None, message: str,
) -> None:
    job_id, out, _ = detached
    template = json.loads(broker.client(cluster.url).get(records.key(job_id)))
    bad = forged(cluster, template, change, raw)
    try:
        proc = run(["result", bad, "--timeout", "5"], cluster_env)
        one_line_error(proc, message, bad)
        assert "Traceback" not in proc.stderr and not out.exists()
        if "output path" not in message and "lossless" not in message:  # the record itself is refused: by status too
            one_line_error(run(["status", bad], cluster_env), message, "delete it (or let it expire)")
    finally:
        broker.client(cluster.url).delete(records.key(bad))


def test_a_record_filed_under_another_jobs_id_is_refused(
    cluster: LocalCluster, cluster_env: dict[str, str], detached: tuple[str, Path, np.ndarray],
) -> None:
    job_id, _, _ = detached
    db = broker.client(cluster.url)
    bad = f"forged-{uuid.uuid4()}"
    db.set(records.key(bad), db.get(records.key(job_id)), ex=300)
    try:
        one_line_error(run(["result", bad], cluster_env), f"it describes job '{job_id}'")
    finally:
        db.delete(records.key(bad))


# --- bad settings ---------------------------------------------------------------------------------

BAD_SETTINGS = [
    ("LUMINAGRID_VISIBILITY_TIMEOUT_S", "abc",
     "LUMINAGRID_VISIBILITY_TIMEOUT_S='abc' is not a whole number; set it to e.g. 3600."),
    ("LUMINAGRID_MAX_PIXELS", "-3", "LUMINAGRID_MAX_PIXELS=-3 is below 1; set it to e.g. 250000000."),
    ("LUMINAGRID_LIVENESS_TTL_S", "fast", "LUMINAGRID_LIVENESS_TTL_S='fast' is not a number; set it to e.g. 2."),
]
COMMANDS = [["submit", "photo.png"], ["submit", "a.png", "b.png", "--detach"], ["status", "j"], ["result", "j"],
            ["cancel", "j"], ["workers"], ["ops"], ["cluster", "--workers", "1"]]


@pytest.mark.parametrize(("name", "value", "message"), BAD_SETTINGS)
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_a_bad_setting_is_one_line_and_exit_1_for_every_command(
    command: list[str], name: str, value: str, message: str,
) -> None:
    proc = run(command, no_redis_env(**{name: value}))
    assert proc.stdout == ""
    one_line_error(proc, message)


@pytest.mark.parametrize("what", ["worker", "flower"])
def test_a_bad_setting_stops_celery_with_one_line(what: str) -> None:
    env = no_redis_env(LUMINAGRID_VISIBILITY_TIMEOUT_S="abc")
    proc = subprocess.run([sys.executable, "-m", "celery", "-A", "luminagrid", what], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    one_line_error(proc, "LUMINAGRID_VISIBILITY_TIMEOUT_S='abc' is not a whole number; set it to e.g. 3600.")
    assert "Traceback" not in proc.stderr


# --- inputs and output formats --------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "channels"), [(np.float32, 1), (np.float32, 3), (np.float64, 1), (np.int32, 1)])
def test_a_float_tiff_is_refused_naming_the_file_and_its_type(tmp_path: Path, dtype: type, channels: int) -> None:
    path = tmp_path / "float.tif"
    shape = (40, 30) if channels == 1 else (40, 30, channels)
    assert cv2.imwrite(str(path), (np.random.default_rng(1).random(shape) * 200).astype(dtype))
    name = np.dtype(dtype).name
    for op in ("canny", "gaussian"):
        proc = run(["submit", str(path), "--op", op], no_redis_env())
        one_line_error(proc, f"{path}: its samples are {name}", "8- and 16-bit images (uint8, uint16)", "convert it")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float.tif"]


@pytest.mark.parametrize("op", ["gaussian", "bilateral", "denoise"])
@pytest.mark.parametrize("suffix", [".pgm", ".pbm", ".PGM"])
def test_a_colour_result_to_a_gray_only_format_is_refused_before_submitting(tmp_path: Path, op: str, suffix: str) -> None:
    path = tmp_path / "colour.png"
    cv2.imwrite(str(path), synthetic(97, 40, 30, channels=3))
    out = tmp_path / f"out{suffix}"
    proc = run(["submit", str(path), "--op", op, "-o", str(out)], no_redis_env())
    one_line_error(proc, f"{out}: {suffix.lower()} holds gray images only, but --op {op} on a colour image gives colour",
                   "use .png or .tif")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["colour.png"]


def test_gray_levels_to_a_one_bit_pbm_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "gray.png"
    cv2.imwrite(str(path), synthetic(98, 40, 30))
    proc = run(["submit", str(path), "--op", "gaussian", "-o", str(tmp_path / "out.pbm")], no_redis_env())
    one_line_error(proc, ".pbm holds 1 bit per pixel", "--op gaussian gives gray levels", "use .png, .tif or .pgm")


def test_detach_refuses_a_gray_only_format_too(cluster_env: dict[str, str], tmp_path: Path) -> None:
    """(`--detach` publishes through the batch path; batches themselves always write `.png`.)"""
    path = tmp_path / "colour.png"
    cv2.imwrite(str(path), synthetic(99, 40, 30, channels=3))
    proc = run(["submit", str(path), "--detach", "--op", "gaussian", "-o", str(tmp_path / "out.pgm")], cluster_env)
    assert proc.returncode == 1 and ".pgm holds gray images only" in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("suffix", [".pbm", ".pgm"])
def test_canny_edges_go_exactly_into_pbm_and_pgm_even_from_colour(
    cluster_env: dict[str, str], tmp_path: Path, suffix: str,
) -> None:
    path = tmp_path / "colour.png"
    image = synthetic(100, 80, 60, channels=3)
    cv2.imwrite(str(path), image)
    out = tmp_path / f"edges{suffix}"
    proc = run(["submit", str(path), "--codec", "lossless", "-o", str(out)], cluster_env)
    assert proc.returncode == 0, proc.stderr
    expected = cv2.Canny(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), 100, 200)
    assert np.array_equal(cv2.imread(str(out), cv2.IMREAD_UNCHANGED), expected)
