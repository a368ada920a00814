"""`--json` on `submit`, `status`, `result` and `workers`: one object per line on stdout, the
usual text on stderr. Real subprocesses against the session's Redis and workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import CLI, synthetic, wait_for

from luminagrid import broker
from luminagrid.local import LocalCluster, free_port
from luminagrid.settings import QUEUE

RUN_TIMEOUT_S = 120
IMAGE_KEYS = {"job_id", "source", "output", "status", "op", "width", "height", "strips", "codec", "quality",
              "workers", "recoveries", "seconds"}


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def objects(stdout: str) -> list[dict[str, Any]]:
    """Every line of stdout, each one JSON object (nothing else may be there)."""
    lines = stdout.splitlines()
    assert lines and all(line.startswith("{") for line in lines), stdout
    return [json.loads(line) for line in lines]


def photo(folder: Path, seed: int, height: int = 120, width: int = 90, channels: int = 1) -> tuple[Path, np.ndarray]:
    path = folder / f"p{seed}.png"
    image = synthetic(seed, height, width, channels)
    cv2.imwrite(str(path), image)
    return path, image


def test_submit_json_prints_one_object_and_the_summary_on_stderr(cluster_env: dict[str, str], tmp_path: Path) -> None:
    path, image = photo(tmp_path, 91)
    proc = run(["submit", str(path), "--json", "--codec", "lossless", "--strips", "3", "--low", "30", "--high", "90"],
               cluster_env)
    assert proc.returncode == 0, proc.stderr
    [obj] = objects(proc.stdout)
    assert set(obj) == IMAGE_KEYS  # no "error" when done
    out = tmp_path / "p91.edges.png"
    assert obj["status"] == "done" and obj["source"] == str(path) and obj["output"] == str(out)
    assert (obj["op"], obj["width"], obj["height"], obj["strips"]) == ("canny", 90, 120, 3)
    assert (obj["codec"], obj["quality"], obj["recoveries"]) == ("lossless", None, 0)
    assert isinstance(obj["job_id"], str) and obj["seconds"] > 0
    assert sum(obj["workers"].values()) == 3 and all(name.startswith("local") for name in obj["workers"])
    assert np.array_equal(cv2.imread(str(out), cv2.IMREAD_UNCHANGED), cv2.Canny(image, 30, 90))
    assert f"{path} 90x120 canny -> {out} | 3 strips (lossless)" in proc.stderr  # the human line, on stderr


def test_a_batch_gives_an_object_per_image_and_a_failed_one_says_why(cluster_env: dict[str, str], tmp_path: Path) -> None:
    good, _ = photo(tmp_path, 92)
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    proc = run(["submit", str(good), str(bad), "--json", "--out-dir", str(tmp_path / "out"), "--op", "gaussian"],
               cluster_env)
    assert proc.returncode == 1
    found = {o["source"]: o for o in objects(proc.stdout)}
    assert set(found) == {str(good), str(bad)}
    assert found[str(good)]["status"] == "done" and Path(found[str(good)]["output"]).is_file()
    assert (found[str(good)]["op"], found[str(good)]["codec"], found[str(good)]["quality"]) == ("gaussian", "jpeg", 95)
    failed = found[str(bad)]
    assert failed["status"] == "failed" and "not a readable image" in failed["error"] and failed["job_id"] is None
    assert "2 images: 1 ok, 1 failed" in proc.stderr  # the table, on stderr


def test_detach_status_and_result_json(cluster_env: dict[str, str], tmp_path: Path) -> None:
    path, image = photo(tmp_path, 93, 200, 150)
    proc = run(["submit", str(path), "--json", "--detach", "--codec", "lossless", "--strips", "4"], cluster_env)
    assert proc.returncode == 0, proc.stderr
    [detached] = objects(proc.stdout)
    job_id = detached["job_id"]
    assert detached["status"] == "detached" and detached["strips"] == 4 and detached["seconds"] is None
    assert f"job {job_id} {path} -> " in proc.stderr

    def finished() -> dict[str, Any] | None:
        shown = run(["status", job_id, "--json"], cluster_env)
        assert shown.returncode == 0, shown.stderr
        [obj] = objects(shown.stdout)
        return obj if obj["state"] == "done" else None
    status = wait_for(finished, 60, "the job to be done", poll_s=0.2)
    assert status["job_id"] == job_id
    assert (status["strips_done"], status["strips_total"], status["strips_running"]) == (4, 4, 0)
    assert (status["width"], status["height"]) == (150, 200) and status["output"] == str(tmp_path / "p93.edges.png")
    assert status["unfinished"] == [] and status["error"] is None and status["age_s"] >= 0

    collected = run(["result", job_id, "--json"], cluster_env)
    assert collected.returncode == 0, collected.stderr
    [obj] = objects(collected.stdout)
    assert obj["status"] == "done" and obj["job_id"] == job_id and obj["source"] is None
    assert obj["output"] == status["output"] and sum(obj["workers"].values()) == 4
    assert np.array_equal(cv2.imread(obj["output"], cv2.IMREAD_UNCHANGED), cv2.Canny(image, 100, 200))

    gone = run(["result", job_id, "--json"], cluster_env)  # collected: an error, stdout stays empty
    assert gone.returncode == 1 and gone.stdout == ""
    assert gone.stderr.count("\n") == 1 and f"no job '{job_id}'" in gone.stderr


def test_a_single_image_that_fails_still_gives_its_object(tmp_path: Path) -> None:
    path, _ = photo(tmp_path, 94, channels=3)
    env = {**os.environ, "LUMINAGRID_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    proc = run(["submit", str(path), "--json", "--op", "bilateral", "-o", str(tmp_path / "x.pgm")], env)
    assert proc.returncode == 1
    [obj] = objects(proc.stdout)
    assert obj["status"] == "failed" and obj["op"] == "bilateral" and ".pgm holds gray images only" in obj["error"]
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1


def test_workers_json_gives_an_object_per_worker(cluster: LocalCluster, cluster_env: dict[str, str]) -> None:
    proc = run(["workers", "--json"], cluster_env)
    assert proc.returncode == 0, proc.stderr
    found = {o["name"]: o for o in objects(proc.stdout)}
    assert set(found) == {n.name for n in cluster.nodes}
    for obj in found.values():
        assert obj["online"] is True and obj["alive"] is True and obj["pool_processes"] == 1
        assert obj["host"] == obj["name"].split("@", 1)[1] and obj["beat_age_s"] >= 0
        assert isinstance(obj["active_strips"], int) and isinstance(obj["processed"], int)
        assert obj["liveness"].startswith("beat ")
    assert "active strips" in proc.stderr  # the table, on stderr


@pytest.mark.parametrize("command", [["status", "nope"], ["workers", "--timeout", "1"]])
def test_errors_under_json_are_one_line_on_stderr_and_nothing_on_stdout(command: list[str]) -> None:
    env = {**os.environ, "LUMINAGRID_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    proc = run([*command, "--json"], env)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("error: no Redis answers at") and proc.stderr.count("\n") == 1


def test_status_json_lists_each_unfinished_strip(tmp_path: Path) -> None:
    path, _ = photo(tmp_path, 95)
    with LocalCluster(workers=0) as c:  # nobody takes the strips: they stay queued
        env = {**os.environ, "LUMINAGRID_BROKER_URL": c.url}
        job_id = objects(run(["submit", str(path), "--json", "--detach", "--strips", "3"], env).stdout)[0]["job_id"]
        proc = run(["status", job_id, "--json"], env)
    assert proc.returncode == 0, proc.stderr
    [obj] = objects(proc.stdout)
    assert (obj["state"], obj["strips_done"], obj["strips_total"], obj["strips_running"]) == ("queued", 0, 3, 0)
    assert obj["unfinished"] == [
        {"index": i, "where": "queued", "worker": None, "alive": None, "running": False} for i in range(3)
    ]
    assert obj["recovered"] == [] and obj["error"] is None
    assert f"job {job_id}: queued | 0/3 strips done" in proc.stderr


def test_an_interrupted_batch_gives_the_cancelled_images_objects(tmp_path: Path) -> None:
    paths = [photo(tmp_path, seed)[0] for seed in (96, 97)]
    with LocalCluster(workers=0) as c:  # nobody computes: both jobs wait in flight
        env = {**os.environ, "LUMINAGRID_BROKER_URL": c.url}
        proc = subprocess.Popen([*CLI, "submit", *map(str, paths), "--json", "--strips", "2"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: broker.client(c.url).llen(QUEUE) >= 4, 30, "both jobs to be queued")
            proc.send_signal(signal.SIGINT)
            stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130, stderr
    found = {o["source"]: o for o in objects(stdout)}
    assert set(found) == set(map(str, paths))
    for obj in found.values():
        assert obj["status"] == "cancelled" and obj["error"] == f"cancelled job {obj['job_id']}"
