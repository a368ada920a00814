"""Operating it: Flower sees workers and labelled tasks, `cli.py cluster`, `cli.py workers`."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import CLI, cli_cluster, processes_with, synthetic, wait_for

import luminagrid
from luminagrid.app import use_broker
from luminagrid.local import LocalCluster, LocalFlower, free_port
from luminagrid.strips import plan_strips

AUTH = "admin:flower-secret"


def get(url: str, auth: str | None = AUTH) -> tuple[int, Any]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            body = reply.read()
            kind = reply.headers.get("Content-Type", "")
            return reply.status, json.loads(body) if "json" in kind else body.decode()
    except urllib.error.HTTPError as exc:
        return exc.code, None


def wait_for_flower(flower: LocalFlower) -> None:
    """Flower subscribes to events a moment after it answers: wait until it has seen a job."""
    def flower_saw_a_job() -> bool:
        probe = luminagrid.submit(synthetic(61, 16, 16), strips=1)
        probe.wait(30)
        return get(f"{flower.url}/api/task/info/{probe.id}")[0] == 200
    wait_for(flower_saw_a_job, 60, "Flower to receive task events", poll_s=0.5)


def wait_for_success(flower: LocalFlower, ids: list[str]) -> dict[str, Any]:
    """Flower's tasks, once it shows every task of `ids` as SUCCESS."""
    def all_succeeded() -> dict[str, Any] | None:
        status, tasks = get(f"{flower.url}/api/tasks?limit=1000")
        if status != 200 or not all(tasks.get(t, {}).get("state") == "SUCCESS" for t in ids):
            return None
        return tasks
    return wait_for(all_succeeded, 30, "Flower to show every task as SUCCESS", poll_s=0.2)


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, LocalFlower]]:
    # At INFO, as deployed (docker-compose.yml): every task's outcome is a line of the log.
    with LocalCluster(workers=2, concurrency=1, worker_args=["--loglevel", "INFO"]) as c:
        log = tmp_path_factory.mktemp("flower") / "flower.log"
        flower = LocalFlower(c.url, free_port(), AUTH, log_path=log).start()
        try:
            yield c, flower
        finally:
            flower.stop()


def test_flower_lists_both_workers_and_every_task_of_a_job_with_a_short_label(
    watched: tuple[LocalCluster, LocalFlower],
) -> None:
    c, flower = watched
    use_broker(c.url)
    wait_for_flower(flower)

    image = synthetic(62, 300, 200)
    job = luminagrid.submit(image, strips=5, codec="lossless", low=30, high=90)
    assert np.array_equal(job.wait(30).edges, cv2.Canny(image, 30, 90))
    ids = [job.strip_task_id(i) for i in range(5)] + [job.id]

    tasks = wait_for_success(flower, ids)
    for s in plan_strips(300, 5, 8):
        task = tasks[job.strip_task_id(s.index)]
        assert task["name"] == "luminagrid.strip"
        assert task["args"] == f"job {job.id[:8]} canny strip {s.index + 1}/5 rows {s.row0}-{s.row1}"
    stitch = tasks[job.id]
    assert stitch["name"] == "luminagrid.stitch" and stitch["args"] == f"job {job.id[:8]} canny stitch 5 strips"
    assert all(len(str(tasks[t]["args"])) < 80 and len(str(tasks[t].get("kwargs"))) < 80 for t in ids)

    status, workers = get(f"{flower.url}/api/workers?refresh=1")
    assert status == 200 and sorted(workers) == sorted(n.name for n in c.nodes)
    assert get(f"{flower.url}/api/workers", auth=None)[0] == 401  # basic auth is on
    status, metrics = get(f"{flower.url}/metrics", auth=None)
    assert status == 200 and "flower_events_total" in metrics


#: What would betray result bytes in a log line: hex (saferepr's form of binary bytes) or base64.
RESULT_BYTES = re.compile(r"[0-9a-f]{64,}|[A-Za-z0-9+/]{64,}={0,2}|\\x[0-9a-f]{2}")
#: "job 5f3a87b2 canny strip 3/9 rows 480-720: 0.04 s, 41 KB out, claim"
SUMMARY = r"{label}: \d+\.\d\d s, \d+(?:\.\d)? (?:B|KB|MB) out, (?:claim|inline)"


def test_a_worker_log_at_info_and_flower_say_what_each_task_did_never_its_bytes(
    watched: tuple[LocalCluster, LocalFlower],
) -> None:
    c, flower = watched
    use_broker(c.url)
    wait_for_flower(flower)
    # Canny (edge bit maps and pending pixels inline) and a blur whose strips' pixels go as claims.
    gray = synthetic(64, 600, 400)
    edges = luminagrid.submit(gray, strips=4, codec="lossless", low=30, high=90)
    blur = luminagrid.submit(gray, op="gaussian", params={"sigma": 1.5}, strips=3, codec="lossless")
    assert np.array_equal(edges.wait(30).edges, cv2.Canny(gray, 30, 90))
    blur.wait(30)
    expected = {}
    for job, op in ((edges, "canny"), (blur, "gaussian")):
        count = job.spec.strips
        for s in plan_strips(600, count, job.spec.halo_rows):
            expected[job.strip_task_id(s.index)] = SUMMARY.format(
                label=re.escape(f"job {job.id[:8]} {op} strip {s.index + 1}/{count} rows {s.row0}-{s.row1}"))
        expected[job.id] = SUMMARY.format(label=re.escape(f"job {job.id[:8]} {op} stitch {count} strips"))

    # Flower's result column: the summary, from the task-succeeded event.
    tasks = wait_for_success(flower, list(expected))
    for task_id, pattern in expected.items():
        assert re.fullmatch(pattern, tasks[task_id]["result"]), (task_id, tasks[task_id]["result"][:200])
    assert any(tasks[blur.strip_task_id(i)]["result"].endswith(", claim") for i in range(3))

    # The workers' logs: one short line per task, the summary after "succeeded in ...s:".
    lines = [line for n in c.nodes if n.log_path for line in n.log_path.read_text(errors="replace").splitlines()]
    for task_id, pattern in expected.items():
        succeeded = re.compile(rf".*\] succeeded in \d+\.\d+s: {pattern}")
        assert [line for line in lines if f"[{task_id}]" in line and succeeded.fullmatch(line)], task_id
    assert not [line for line in lines if len(line) > 300], max(lines, key=len)[:400]
    assert not [line for line in lines if RESULT_BYTES.search(line)], [line[:200] for line in lines if RESULT_BYTES.search(line)]


def test_workers_command_lists_the_online_workers(watched: tuple[LocalCluster, LocalFlower]) -> None:
    c, _ = watched
    proc = subprocess.run([*CLI, "workers"], env={**os.environ, "LUMINAGRID_BROKER_URL": c.url},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for node in c.nodes:
        assert node.name in proc.stdout
    assert "pool" in proc.stdout and "active strips" in proc.stdout and "processed" in proc.stdout


def test_workers_command_with_no_workers_fails_clearly() -> None:
    with LocalCluster(workers=0) as c:
        proc = subprocess.run([*CLI, "workers", "--timeout", "1"], env={**os.environ, "LUMINAGRID_BROKER_URL": c.url},
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert f"no worker answered within 1 s at {c.url}" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cluster_runs_a_whole_system_and_stops_everything(tmp_path: Path, sig: signal.Signals) -> None:
    port = free_port()
    with cli_cluster(2, port) as run:
        assert f"Flower at http://127.0.0.1:{port}/" in run.banner[0], run.banner
        assert get(f"http://127.0.0.1:{port}/healthcheck", auth=None)[0] == 200

        photo = tmp_path / "photo.png"
        cv2.imwrite(str(photo), synthetic(63, 90, 70))
        # Two strips (one such small image would go whole, as its file): both workers serve it.
        submitted = subprocess.run([*CLI, "submit", str(photo), "--codec", "lossless", "--strips", "2"],
                                   env={**os.environ, "LUMINAGRID_BROKER_URL": run.url}, capture_output=True,
                                   text=True, timeout=60)
        assert submitted.returncode == 0, submitted.stderr
        assert "served by local1@" in submitted.stdout and "local2@" in submitted.stdout
        assert len(processes_with(run.marker)) >= 1 + 1 + 2 + 1  # cli, redis, 2 workers (+ pool), flower
        run.stop(sig)
    assert run.proc.returncode == 0, run.err
    assert "stopping" in run.out
    assert processes_with(run.marker) == []
