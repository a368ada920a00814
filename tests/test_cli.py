"""`python cli.py submit` as a user runs it: real subprocesses, exit codes and messages."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import CLI, processes_with, synthetic

from luminagrid import broker
from luminagrid.local import free_port
from luminagrid.settings import DEFAULT_BROKER_URL

RUN_TIMEOUT_S = 120


def run(args: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    cv2.imwrite(str(path), synthetic(21, 301, 257, channels=3))
    return path


def gray_of(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2GRAY)


def test_submit_writes_the_exact_edge_map_beside_the_input(cluster_env: dict[str, str], photo: Path) -> None:
    proc = run(["submit", str(photo), "--codec", "lossless", "--strips", "3", "--low", "50", "--high", "150"], cluster_env)
    assert proc.returncode == 0, proc.stderr
    out = photo.with_name("photo.edges.png")
    assert np.array_equal(cv2.imread(str(out), cv2.IMREAD_UNCHANGED), cv2.Canny(gray_of(photo), 50, 150))
    assert "257x301" in proc.stdout and "3 strips (lossless)" in proc.stdout and "served by local" in proc.stdout
    assert "embedded" not in proc.stdout
    assert sorted(p.name for p in photo.parent.iterdir()) == ["photo.edges.png", "photo.png"]  # no temp files


def test_submit_honours_out_and_jpeg_quality(cluster_env: dict[str, str], photo: Path, tmp_path: Path) -> None:
    out = tmp_path / "result.tif"
    proc = run(["submit", str(photo), "-o", str(out), "--quality", "80"], cluster_env)
    assert proc.returncode == 0, proc.stderr
    ok, buf = cv2.imencode(".jpg", gray_of(photo), [cv2.IMWRITE_JPEG_QUALITY, 80])
    expected = cv2.Canny(cv2.imdecode(buf, cv2.IMREAD_UNCHANGED), 100, 200)
    assert np.array_equal(cv2.imread(str(out), cv2.IMREAD_UNCHANGED), expected)
    assert "(jpeg q80)" in proc.stdout


def test_verbose_submit_shows_where_the_time_went(cluster_env: dict[str, str], photo: Path) -> None:
    started = time.monotonic()
    proc = run(["submit", str(photo), "--codec", "lossless", "--strips", "3", "--verbose"], cluster_env)
    outside_ms = (time.monotonic() - started) * 1e3
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout.split("time per stage", 1)[1]
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in table.splitlines() if line.count("│") == 4}
    # Every stage, in pipeline order; a Canny PNG is fetched as it is written (no separate collect).
    stages = ["read", "convert", "encode", "publish", "compute", "stitch", "write"]
    assert [name for name in rows if name in stages] == stages and "collect" not in rows
    total_ms = float(rows["total (from process start)"])
    assert all(float(rows[name]) >= 0 for name in stages) and total_ms > 0
    assert float(rows["workers: compute (sum over strips)"]) > 0
    # The stages and the rest add up to the total...
    parts = sum(float(rows[name]) for name in stages) + float(rows["other (start-up, imports, embedded cluster)"])
    assert abs(parts - total_ms) < 1.0
    # ...which is the wall time a user sees, measured outside the process: all but printing the
    # table and the interpreter's exit (the process's start is known to 10 ms, a clock tick).
    print(f"\n--verbose total {total_ms:.0f} ms, wall time outside the process {outside_ms:.0f} ms")
    assert outside_ms - 300 <= total_ms <= outside_ms + 20


def test_an_explicit_url_with_no_redis_is_an_error_naming_it(photo: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    env = {**os.environ, "LUMINAGRID_BROKER_URL": url}
    proc = run(["submit", str(photo)], env)
    assert proc.returncode == 1
    assert f"no Redis answers at {url}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not photo.with_name("photo.edges.png").exists()


def test_passwords_in_urls_are_not_printed(photo: Path) -> None:
    env = {**os.environ, "LUMINAGRID_BROKER_URL": f"redis://:s3cret@127.0.0.1:{free_port()}/0"}
    proc = run(["submit", str(photo)], env)
    assert proc.returncode == 1 and "s3cret" not in proc.stderr and ":***@" in proc.stderr


def embedded_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUMINAGRID_")}
    env["LUMINAGRID_TEST_MARKER"] = f"marker-{uuid.uuid4()}"
    return env


def test_with_no_redis_configured_submit_runs_embedded_and_stops_everything(photo: Path) -> None:
    if broker.answers(DEFAULT_BROKER_URL):
        pytest.skip("a Redis answers at the default URL, so embedded mode would not be chosen")
    env = embedded_env()
    proc = run(["submit", str(photo), "--codec", "lossless", "--workers", "2"], env)
    assert proc.returncode == 0, proc.stderr
    assert "ran embedded" in proc.stdout and "LUMINAGRID_BROKER_URL" in proc.stdout
    out = photo.with_name("photo.edges.png")
    assert np.array_equal(cv2.imread(str(out), cv2.IMREAD_UNCHANGED), cv2.Canny(gray_of(photo), 100, 200))
    assert processes_with(env["LUMINAGRID_TEST_MARKER"]) == []


def test_embedded_flag_forces_a_private_cluster(cluster_env: dict[str, str], photo: Path) -> None:
    env = {**cluster_env, "LUMINAGRID_TEST_MARKER": f"marker-{uuid.uuid4()}"}
    proc = run(["submit", str(photo), "--embedded", "--workers", "1"], env)
    assert proc.returncode == 0, proc.stderr
    assert "ran embedded" in proc.stdout and "served by local1@" in proc.stdout
    assert processes_with(env["LUMINAGRID_TEST_MARKER"]) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--low", "300", "--high", "200"], "--op canny: low 300 is above high 200; make low <= high."),
        (["--high", "5000"], "parameter high=5000.0 is out of range; use a number from 0 to 2040"),
        (["--low", "-1"], "parameter low=-1.0 is out of range"),
        (["--op", "sharpen"], "unknown operation --op 'sharpen'; choose one of: canny, gaussian, bilateral, denoise (`python cli.py ops` lists them"),
        (["--op", "bilateral", "-p", "d=40"], "--op bilateral: parameter d='40' is out of range; use a whole number from 1 to 31"),
        (["--op", "bilateral", "-p", "radius=3"], "--op bilateral has no parameter 'radius'; its parameters are: d, sigma_color"),
        (["--op", "denoise", "-p", "search_window=20"], "search_window='20' is out of range; use an odd whole number"),
        (["-p", "low"], "-p 'low' is not NAME=VALUE; write e.g. -p d=9."),
        (["--op", "gaussian", "--low", "5"], "--low is a Canny threshold; for --op gaussian use -p NAME=VALUE"),
        (["--jobs", "0"], "--jobs 0 is out of range; use 1 to 64."),
        (["-o", "x.png", "--out-dir", "elsewhere"], "-o and --out-dir both say where the output goes; give one of them."),
        (["--quality", "0"], "--quality 0 is out of range"),
        (["--quality", "101"], "--quality 101 is out of range"),
        (["--strips", "0"], "--strips 0 is out of range"),
        (["-o", "edges.jpg"], "is not lossless"),
    ],
)
def test_bad_parameters_fail_before_any_work_with_a_clear_message(
    photo: Path, args: list[str], message: str,
) -> None:
    env = {**os.environ, "LUMINAGRID_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    proc = run(["submit", str(photo), *args], env, cwd=photo.parent)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in photo.parent.iterdir()) == ["photo.png"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.png", "no such file"),
        (lambda d: d, "holds no images"),
        (lambda d: (d / "empty.png", (d / "empty.png").write_bytes(b""))[0], "is empty"),
        (lambda d: (d / "text.png", (d / "text.png").write_text("hello"))[0], "not a readable image"),
    ],
)
def test_bad_inputs_fail_with_a_clear_message(tmp_path: Path, make, message: str) -> None:  # noqa: ANN001
    env = {**os.environ, "LUMINAGRID_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    proc = run(["submit", str(make(tmp_path))], env)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_codec_is_a_usage_error(photo: Path) -> None:
    proc = run(["submit", str(photo), "--codec", "png"], dict(os.environ))
    assert proc.returncode == 2
    assert "png" in proc.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_an_embedded_run_stops_everything_it_started(tmp_path: Path, sig: signal.Signals) -> None:
    big = tmp_path / "big.png"
    cv2.imwrite(str(big), synthetic(22, 2160, 3840))
    env = embedded_env()
    marker = env["LUMINAGRID_TEST_MARKER"]
    proc = subprocess.Popen([*CLI, "submit", str(big), "--embedded", "--workers", "1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Interrupt once it has started Redis and a worker (3+ processes carry the marker).
        deadline = time.monotonic() + 60
        while len(processes_with(marker)) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert processes_with(marker) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.png"]
