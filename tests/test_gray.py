"""Gray failures on real workers: a strip whose pool process hangs, a worker that crawls, a strip
that is slow for good reasons, and two runs of one strip that both finish.

Every operation (the built-ins and the example plugin's median and morph) is hung once and slowed
once. The workers load `tests/faults.py`: every strip first computes (burns CPU) for
`STRIP_DELAY_S`, so a fault lands on a strip in flight, and records its runs. The faults are real
signals: SIGSTOP (a process that stays alive and makes no progress) and a SIGSTOP/SIGCONT duty
cycle (a process at 10 % of its speed). Jobs go through `cli.py` (submit --detach, result), so the
plugin's operations need no registration in this process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import psutil
import pytest
from conftest import CLI, REPO, synthetic, wait_for
from test_supervision import print_logs

import faults
from luminagrid import liveness, ops, speculation
from luminagrid.broker import client
from luminagrid.local import LocalCluster
from luminagrid.settings import EVENTS_KEY

STRIP_DELAY_S = 1.5
STALL_S = 2.0
#: op, params, channels, the whole-image reference (on the lossless input)
CASES: dict[str, tuple[dict[str, Any], int, Any]] = {
    "canny": ({"low": 30, "high": 90}, 1, lambda a: ops.get("canny").apply(a, ops.get("canny").values({"low": 30, "high": 90}))),
    "gaussian": ({"sigma": 3.0}, 3, lambda a: ops.get("gaussian").apply(a, ops.get("gaussian").values({"sigma": 3.0}))),
    "bilateral": ({"d": 7}, 3, lambda a: ops.get("bilateral").apply(a, ops.get("bilateral").values({"d": 7}))),
    "denoise": ({}, 1, lambda a: ops.get("denoise").apply(a, ops.get("denoise").values({}))),
    "median": ({"ksize": 7}, 1, lambda a: cv2.medianBlur(a, 7)),
    "morph": ({"mode": "close", "ksize": 9}, 3, lambda a: cv2.morphologyEx(a, cv2.MORPH_CLOSE, np.ones((9, 9), np.uint8))),
}


@pytest.fixture(scope="module")
def gray(plugin_site: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, Path, dict[str, str]]]:
    """Two workers (one pool process each) with the plugin and the fault module; strips are hung
    after `STALL_S` without CPU (the default is 3 s; shorter keeps the tests short)."""
    runs = tmp_path_factory.mktemp("gray-runs") / "runs.log"
    site = plugin_site
    env = {"PYTHONPATH": f"{site}{os.pathsep}{REPO / 'tests'}", "LUMINAGRID_TEST_RUNS": str(runs),
           "LUMINAGRID_TEST_STRIP_DELAY_S": str(STRIP_DELAY_S), "LUMINAGRID_STALL_S": str(STALL_S)}
    with LocalCluster(workers=2, concurrency=1, worker_env=env, worker_args=["--include", "faults"]) as c:
        cli_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LUMINAGRID_RESULT_BACKEND")}
        cli_env |= {"PYTHONPATH": str(site), "LUMINAGRID_BROKER_URL": c.url}
        yield c, runs, cli_env


def cli(args: list[str], env: dict[str, str], timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout_s)


def submit(op: str, tmp: Path, env: dict[str, str], strips: int, seed: int = 5,
           size: tuple[int, int] = (240, 200)) -> tuple[str, np.ndarray, Path]:
    """Submit a job of `op` with --detach; (job id, its input image, where its output goes)."""
    params, channels, _ = CASES[op]
    image = synthetic(seed, *size, channels)
    path = tmp / f"{op}-{seed}.png"
    cv2.imwrite(str(path), image)
    out = tmp / f"{op}-{seed}.out.png"
    flags = [f for k, v in params.items() for f in ("-p", f"{k}={v}")]
    proc = cli(["submit", str(path), "--op", op, *flags, "--strips", str(strips), "--codec", "lossless",
                "--detach", "--json", "-o", str(out)], env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])["job_id"], image, out


def collect(job_id: str, env: dict[str, str], timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return cli(["result", job_id, "--timeout", str(timeout_s), "--json"], env, timeout_s + 30)


def running(url: str, job_id: str) -> dict[str, tuple[liveness.Node, liveness.Hold]]:
    """Task id -> (node, hold) of the job's strips running in a pool process that used CPU on them."""
    return {h.task_id: (n, h) for n in liveness.read(client(url)) if n.alive
            for h in n.running if h.task_id.startswith(job_id + ".strip") and h.pid and h.cpu_s > 0.05}


def finished(url: str, job_id: str) -> bool:
    """The job's stitch stored its result (nobody collected it yet)."""
    from luminagrid.supervisor import state_of  # noqa: PLC0415

    return state_of(client(url).getrange(f"celery-task-meta-{job_id}", 0, 63)) == "SUCCESS"


def in_flight(runs: Path, pid: int, task_id: str) -> bool:
    """The run records show `pid` started `task_id` and did not end it."""
    mine = [r for r in faults.runs(runs, task_id) if r["pid"] == pid]
    return bool(mine) and mine[-1]["what"] == "start"


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """SIGSTOP `pid`; always SIGCONT it afterwards (if it still exists)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def crawling(pid: int, speed: float = 0.1, period_s: float = 0.1) -> Iterator[None]:
    """Run `pid` at `speed` of its speed: stopped (1 - speed) of every `period_s`."""
    halt = threading.Event()

    def cycle() -> None:
        while not halt.is_set():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
            halt.wait(period_s * (1 - speed))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            halt.wait(period_s * speed)

    thread = threading.Thread(target=cycle, daemon=True)
    thread.start()
    try:
        yield
    finally:
        halt.set()
        thread.join(5)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def output_of(proc: subprocess.CompletedProcess[str], job_id: str) -> tuple[dict[str, Any], np.ndarray]:
    assert proc.returncode == 0, proc.stderr
    done = json.loads(proc.stdout.splitlines()[-1])
    return done, cv2.imread(done["output"], cv2.IMREAD_UNCHANGED)


@pytest.mark.parametrize("op", list(CASES))
def test_a_hung_strip_runs_again_elsewhere_within_seconds_and_its_process_is_replaced(
    gray: tuple[LocalCluster, Path, dict[str, str]], tmp_path: Path, op: str,
) -> None:
    c, runs, env = gray
    job_id, image, _ = submit(op, tmp_path, env, strips=3)
    task_id, (node, hold) = next(iter(wait_for(lambda: running(c.url, job_id), 30, "a strip to run").items()))
    assert in_flight(runs, hold.pid, task_id)  # the fault hits a strip in flight
    with stopped(hold.pid):
        hung_at = time.monotonic()
        wait_for(lambda: finished(c.url, job_id), 60, "the job to finish")
        done_s = time.monotonic() - hung_at
        wait_for(lambda: gone(hold.pid), 10, f"the hung pool process {hold.pid} to be stopped")
    status = json.loads(cli(["status", job_id, "--json"], env).stdout)
    copies = status["copies"]
    done, out = output_of(collect(job_id, env), job_id)
    assert np.array_equal(out, CASES[op][2](image)), f"{op}: the output differs from the whole-image result"
    print(f"\n{op}: a pool process hung (SIGSTOP) mid-strip on {node.id}: job done {done_s:.1f} s later; "
          f"copies {[(x['strip'], x['reason'], x['node'], x['outcome']) for x in copies]}")
    # (A stopped process also falls behind: once the other worker is idle, the straggler rule may
    # copy it before the stall time is up. Either way, one copy, elsewhere, wins.)
    assert [(x["strip"], x["origin"], x["outcome"]) for x in copies] == [
        (int(task_id.rpartition(".strip")[2]), node.id, "won")]
    assert copies[0]["reason"] in ("hung", "slow") and copies[0]["node"] != node.id
    assert done_s <= STALL_S + 8.0, done_s
    starts = Counter(r["task"] for r in faults.runs(runs) if r["what"] == "start" and r["task"].startswith(job_id))
    assert starts[task_id] == 2 and all(v == 1 for t, v in starts.items() if t != task_id), starts
    cli(["status", job_id], env)  # (the human view copes with copies too)


@pytest.mark.parametrize("op", list(CASES))
def test_a_crawling_worker_gets_its_strip_copied_and_the_first_to_finish_wins(
    gray: tuple[LocalCluster, Path, dict[str, str]], tmp_path: Path, op: str,
) -> None:
    """One worker's pool process at 10 % speed (SIGSTOP 90 ms of every 100 ms): once the other
    worker is idle, the crawling strip is copied there, the copy wins and the crawler is stopped."""
    c, runs, env = gray
    seed_id, _, _ = submit(op, tmp_path, env, strips=2, seed=1)  # this cluster's cost of the class
    output_of(collect(seed_id, env), seed_id)
    job_id, image, _ = submit(op, tmp_path, env, strips=2, seed=2)
    both = wait_for(lambda: (r := running(c.url, job_id)) and len({n.id for n, _ in r.values()}) == 2 and r,
                    30, "both workers to run a strip of the job")
    task_id, (node, hold) = sorted(both.items())[0]
    with crawling(hold.pid):
        assert in_flight(runs, hold.pid, task_id)
        try:
            wait_for(lambda: finished(c.url, job_id), 60, "the job to finish")
            wait_for(lambda: gone(hold.pid), 10, f"the crawling pool process {hold.pid} to be stopped")
        except BaseException:
            print_logs(c)
            raise
    copies = json.loads(cli(["status", job_id, "--json"], env).stdout)["copies"]
    done, out = output_of(collect(job_id, env), job_id)
    assert np.array_equal(out, CASES[op][2](image)), f"{op}: the output differs from the whole-image result"
    print(f"\n{op}: a worker at 10 % speed: copies {[(x['strip'], x['reason'], x['node'], x['outcome']) for x in copies]}")
    assert [(x["strip"], x["reason"], x["origin"], x["outcome"]) for x in copies] == [
        (int(task_id.rpartition(".strip")[2]), "slow", node.id, "won")]


def test_a_legitimately_slow_strip_on_a_healthy_cluster_is_never_copied(
    gray: tuple[LocalCluster, Path, dict[str, str]], tmp_path: Path,
) -> None:
    """Denoise at its largest windows: one big strip computes for seconds at full speed while the
    other worker sits idle. Twice: before and with the class's history."""
    c, runs, env = gray
    db = client(c.url)
    image = synthetic(9, 720, 1280)
    path = tmp_path / "big.png"
    cv2.imwrite(str(path), image)
    took, ids = [], []
    for _ in range(2):
        proc = cli(["submit", str(path), "--op", "denoise", "-p", "template_window=15", "-p", "search_window=35",
                    "--strips", "1", "--codec", "lossless", "--json", "-o", str(tmp_path / "big.out.png")], env)
        assert proc.returncode == 0, proc.stderr
        done = json.loads(proc.stdout.splitlines()[-1])
        took.append(done["seconds"])
        ids.append(done["job_id"])
    events = [e["text"] for e in map(json.loads, db.lrange(EVENTS_KEY, 0, -1)) if e.get("job") in ids]
    print(f"\none denoise strip at the largest windows, twice: {took} s; events {events}")
    assert min(took) > STALL_S + 1.0  # it is slow: longer than a stall
    assert not events, events
    assert np.array_equal(cv2.imread(str(tmp_path / "big.out.png"), cv2.IMREAD_UNCHANGED),
                          cv2.fastNlMeansDenoising(image, None, 10.0, 15, 35))


def test_when_both_runs_of_a_strip_finish_the_second_result_is_discarded(
    gray: tuple[LocalCluster, Path, dict[str, str]], tmp_path: Path,
) -> None:
    """A copy that was not needed: the same strip task twice at once, on both workers. Both finish;
    the first stored result stands, the stitch sees one result per strip, the output is exact."""
    from luminagrid import record as records  # noqa: PLC0415
    from luminagrid.tasks import republish_strip  # noqa: PLC0415

    c, runs, env = gray
    job_id, image, _ = submit("median", tmp_path, env, strips=1, seed=3)
    record = records.load(job_id, 10**9)
    wait_for(lambda: running(c.url, job_id), 30, "the strip to run")
    republish_strip(record, 0)  # the other worker takes it at once: two runs of strip 0
    task_id = f"{job_id}.strip0"
    wait_for(lambda: len([r for r in faults.runs(runs, task_id) if r["what"] == "end"]) == 2, 30, "both runs to end")
    done, out = output_of(collect(job_id, env), job_id)
    ends = [r for r in faults.runs(runs, task_id) if r["what"] == "end"]
    print(f"\nboth runs of one strip finished: pids {[r['pid'] for r in ends]}; workers {done['workers']}")
    assert len({r["pid"] for r in ends}) == 2
    assert sum(done["workers"].values()) == 1  # one result joined the chord
    assert np.array_equal(out, cv2.medianBlur(image, 7))


def test_a_strip_that_hangs_on_every_worker_fails_its_job_naming_the_strip(
    gray: tuple[LocalCluster, Path, dict[str, str]], tmp_path: Path,
) -> None:
    c, runs, env = gray
    image = synthetic(11, 64, 96)
    image[32, : faults.HANG.size] = faults.HANG  # the first own row of strip 2 of 2 (rows 32-64)
    path = tmp_path / "hangs.png"
    cv2.imwrite(str(path), image)
    started = time.monotonic()
    proc = cli(["submit", str(path), "--strips", "2", "--codec", "lossless", "-p", "low=30", "-p", "high=90",
                "-o", str(tmp_path / "never.png")], env, timeout_s=90)
    took = time.monotonic() - started
    print(f"\na strip that hangs everywhere: exit {proc.returncode} after {took:.1f} s: {proc.stderr.strip()}")
    assert proc.returncode == 1
    assert "strip 2/2 (rows 32-64) hung on every worker it ran on" in proc.stderr
    assert all(n.name.split("@")[0] in proc.stderr for n in c.nodes)
    assert not (tmp_path / "never.png").exists()
    assert took < 3 * STALL_S + 15
