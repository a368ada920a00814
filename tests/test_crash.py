"""Crash-proofing with real processes: SIGKILLed pool processes and workers, Redis restarts.

These workers load `tests/faults.py`: every strip sleeps a little (so it can be killed mid-run),
and a strip starting with `faults.POISON` kills its own process every time.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REPO, synthetic, wait_for
from faults import POISON

import luminagrid
from luminagrid import broker, jobs
from luminagrid.app import use_broker
from luminagrid.errors import JobFailed
from luminagrid.local import LocalCluster, LocalWorker, wait_for_workers
from luminagrid.settings import UNACKED_MUTEX_EXPIRE_S

VISIBILITY_TIMEOUT_S = 10
STRIP_DELAY_S = 0.15
SOAK_JOBS = int(os.environ.get("LUMINAGRID_SOAK_JOBS", "10"))
REDIS_RESTARTS = int(os.environ.get("LUMINAGRID_REDIS_RESTARTS", "10"))


def faulty_cluster(max_deliveries: int = 3, worker_args: list[str] | None = None, workers: int = 2) -> LocalCluster:
    return LocalCluster(
        workers=workers, concurrency=2, appendonly=True,
        worker_env={
            "LUMINAGRID_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S),
            "LUMINAGRID_MAX_DELIVERIES": str(max_deliveries),
            "LUMINAGRID_TEST_STRIP_DELAY_S": str(STRIP_DELAY_S),
            "LUMINAGRID_INLINE_MAX_BYTES": "0",
            "PYTHONPATH": str(REPO / "tests"),
        },
        worker_args=["--include", "faults", *(worker_args or [])],
    )


@pytest.fixture(scope="module", autouse=True)
def _every_payload_as_a_claim() -> Iterator[None]:
    """Strip payloads and outputs all travel as claim checks here, so crashes hit that path too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LUMINAGRID_INLINE_MAX_BYTES", "0")
        yield


@pytest.fixture(scope="module")
def _faulty() -> Iterator[LocalCluster]:
    with faulty_cluster() as c:
        yield c


@pytest.fixture
def faulty(_faulty: LocalCluster) -> LocalCluster:
    use_broker(_faulty.url)
    wait_for_workers([n.name for n in _faulty.nodes if n.proc and n.proc.poll() is None],
                     [n.proc for n in _faulty.nodes if n.proc and n.proc.poll() is None])
    return _faulty


def exact(image: np.ndarray, low: float = 30, high: float = 90) -> np.ndarray:
    return cv2.Canny(image, low, high)


def started_strip(job: jobs.Job, hostname: str | None = None) -> tuple[int, int] | None:
    """(strip index, pid of the process running it) of a strip now running, if any."""
    metas = jobs._metas([job.strip_task_id(i) for i in range(job.strip_count)])
    for i, meta in enumerate(metas):
        if meta is not None and meta["status"] == "STARTED":
            if hostname is None or meta["result"]["hostname"] == hostname:
                return i, int(meta["result"]["pid"])
    return None


def pool_children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def print_worker_logs(c: LocalCluster, lines: int = 40) -> None:
    """The last lines of every worker's log: what a failed crash test needs to be diagnosed."""
    for node in c.nodes:
        if node.log_path is not None and node.log_path.exists():
            tail = node.log_path.read_text(errors="replace").splitlines()[-lines:]
            print(f"--- {node.name} (exit {node.proc.poll() if node.proc else None}) ---", *tail, sep="\n")


def test_a_pool_process_killed_mid_strip_is_rerun_and_the_output_stays_exact(faulty: LocalCluster) -> None:
    image = synthetic(31, 400, 333)
    job = luminagrid.submit(image, strips=8, codec="lossless", low=30, high=90)
    index, pid = wait_for(lambda: started_strip(job), 30, "a strip to start")
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(lambda: jobs._metas([job.strip_task_id(index)])[0]["status"] == "SUCCESS", 30, "the strip to be redone")
    print(f"\nstrip {index} redone {time.monotonic() - killed_at:.2f} s after its process was SIGKILLed")
    assert np.array_equal(job.wait(60).edges, exact(image))
    assert all(n.proc is not None and n.proc.poll() is None for n in faulty.nodes)


def test_a_whole_worker_killed_mid_job_is_survived_within_the_visibility_timeout(faulty: LocalCluster) -> None:
    victim = faulty.add_worker(f"victim@{os.uname().nodename}", concurrency=2)
    try:
        wait_for_workers([victim.name], [victim.proc])
        image = synthetic(32, 600, 301)
        job = luminagrid.submit(image, strips=12, codec="lossless", low=30, high=90)
        wait_for(lambda: started_strip(job, victim.name), 30, "a strip to start on the victim")
        os.killpg(victim.proc.pid, signal.SIGKILL)  # the worker and its pool processes
        killed_at = time.monotonic()
        result = job.wait(VISIBILITY_TIMEOUT_S + 30)
        recovery_s = time.monotonic() - killed_at
        print(f"\njob done {recovery_s:.2f} s after its worker was SIGKILLed (visibility timeout {VISIBILITY_TIMEOUT_S} s)")
        assert np.array_equal(result.edges, exact(image))
        assert recovery_s <= VISIBILITY_TIMEOUT_S + 5
    finally:
        victim.stop()
        faulty.nodes.remove(victim)


def test_a_worker_killed_while_holding_the_restore_lock_delays_recovery_by_seconds_not_minutes() -> None:
    """kombu's sweep of unacknowledged messages runs under a Redis lock that outlives a killed holder
    (300 s by default), during which no live worker restores anything."""
    host = os.uname().nodename
    with faulty_cluster(workers=0) as c:
        use_broker(c.url)
        assert c.folder is not None
        victim = LocalWorker(
            f"victim@{host}", c.url, 1, log_path=c.folder / "victim.log",
            # Slow strips: the victim still holds one when its next sweep (every second) runs.
            extra_env={**c.worker_env, "LUMINAGRID_TEST_HOLD_UNACKED_MUTEX": "1", "LUMINAGRID_TEST_STRIP_DELAY_S": "30"},
            extra_args=c.worker_args,
        ).start()
        c.nodes.append(victim)
        wait_for_workers([victim.name], [victim.proc])
        image = synthetic(37, 200, 150)
        job = luminagrid.submit(image, strips=3, codec="lossless", low=30, high=90)
        redis_client = broker.client(c.url)
        wait_for(lambda: redis_client.exists("unacked_mutex") and redis_client.hlen("unacked"), 30,
                 "the victim to take the sweep lock while it holds a strip")
        os.killpg(victim.proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        c.add_worker(f"healthy@{host}")
        result = job.wait(VISIBILITY_TIMEOUT_S + 30)
        recovery_s = time.monotonic() - killed_at
        print(f"\njob done {recovery_s:.2f} s after its worker was SIGKILLed holding the sweep lock")
        assert np.array_equal(result.edges, exact(image))
        assert recovery_s <= VISIBILITY_TIMEOUT_S + UNACKED_MUTEX_EXPIRE_S + 5


def test_a_strip_that_always_kills_its_worker_fails_the_job_after_bounded_deliveries(faulty: LocalCluster) -> None:
    image = synthetic(33, 64, 64)
    image[32, : POISON.size] = POISON  # the first own row of strip 2 of 2
    pids_before = [n.proc.pid for n in faulty.nodes if n.proc]
    job = luminagrid.submit(image, strips=2, codec="lossless")
    with pytest.raises(JobFailed) as failure:
        job.wait(60)
    message = str(failure.value)
    assert "strip 2/2 (rows 32-64)" in message and f"job {job.id}" in message
    assert "killed its worker process on every delivery" in message and "SIGKILL" in message
    # The workers stayed up and still compute.
    assert [n.proc.pid for n in faulty.nodes if n.proc and n.proc.poll() is None] == pids_before
    healthy = synthetic(34, 100, 100)
    assert np.array_equal(luminagrid.submit(healthy, strips=3, codec="lossless", low=30, high=90).wait(30).edges,
                          exact(healthy))


def test_jobs_survive_repeated_redis_restarts_with_aof(faulty: LocalCluster) -> None:
    assert faulty.redis is not None
    rng = random.Random(35)
    timings = []
    for n in range(REDIS_RESTARTS):
        image = synthetic(100 + n, 360, 250)
        delay = rng.uniform(0.0, 0.8)  # lands in publishing, picking up, computing or stitching
        restarter = threading.Timer(delay, faulty.redis.restart)
        started = time.monotonic()
        restarter.start()
        try:
            job = luminagrid.submit(image, strips=rng.randint(2, 9), codec="lossless", low=30, high=90)
            result = job.wait(120)
        finally:
            restarter.join()
        timings.append(time.monotonic() - started)
        assert np.array_equal(result.edges, exact(image)), f"restart {n} at {delay:.2f} s"
    print(f"\n{REDIS_RESTARTS} jobs, one Redis restart each: slowest {max(timings):.1f} s, "
          f"median {sorted(timings)[len(timings) // 2]:.1f} s")


def test_soak_jobs_complete_exactly_under_random_sigkills() -> None:
    """Three jobs in flight at a time while a killer SIGKILLs random pool processes; a third and
    two thirds of the way in, a whole worker (main process and pool) is killed and replaced."""
    with faulty_cluster(max_deliveries=50) as c:
        use_broker(c.url)
        rng = random.Random(36)
        stop = threading.Event()
        kills = {"pool": 0, "worker": 0}

        # Only workers that finished starting are targets: Celery gives up on a worker whose pool
        # process dies during start-up ("Could not start worker processes"), and a supervisor
        # restarts it in production (README); that is not what this test is about.
        ready = list(c.nodes)

        def live_nodes() -> list:
            return [n for n in ready if n.proc and n.proc.poll() is None]

        def kill_pool_processes() -> None:
            while not stop.wait(rng.uniform(0.2, 0.6)):
                children = [p for n in live_nodes() for p in pool_children(n.proc.pid)]
                if children:
                    try:
                        os.kill(rng.choice(children), signal.SIGKILL)
                        kills["pool"] += 1
                    except ProcessLookupError:
                        pass

        def kill_a_worker() -> None:
            node = rng.choice(live_nodes())
            os.killpg(node.proc.pid, signal.SIGKILL)
            kills["worker"] += 1
            node = c.add_worker(f"replacement{kills['worker']}@{os.uname().nodename}")
            wait_for_workers([node.name], [node.proc])
            ready.append(node)

        thread = threading.Thread(target=kill_pool_processes, daemon=True)
        thread.start()
        started = time.monotonic()
        try:
            pending: list[tuple[jobs.Job, np.ndarray]] = []
            for n in range(SOAK_JOBS):
                image = synthetic(200 + n, rng.randint(50, 400), rng.randint(50, 400))
                pending.append((luminagrid.submit(image, strips=rng.randint(1, 8), codec="lossless", low=30, high=90), image))
                if n in (SOAK_JOBS // 3, 2 * SOAK_JOBS // 3):
                    kill_a_worker()
                if len(pending) == 3 or n == SOAK_JOBS - 1:
                    for job, img in pending:
                        assert np.array_equal(job.wait(VISIBILITY_TIMEOUT_S * 6).edges, exact(img)), job.id
                    pending = []
        except BaseException:
            print_worker_logs(c)
            raise
        finally:
            stop.set()
            thread.join()
        print(f"\n{SOAK_JOBS} jobs exact under {kills['pool']} pool-process and {kills['worker']} worker SIGKILLs "
              f"in {time.monotonic() - started:.0f} s")
        assert kills["pool"] > 0 and kills["worker"] == 2
