"""Paused processes (issue 21, part 3), with real workers: the supervising worker frozen mid-job,
and Redis frozen mid-job (SIGSTOP, then SIGCONT).

A frozen supervisor wakes up believing it still supervises; a frozen Redis wakes up with every
liveness record expired by its own clock. Neither may make the cluster act on a stale view:
outputs stay exact, no strip runs more than twice, and no live worker is declared lost.

The workers load `tests/faults.py`: every strip first sleeps `STRIP_DELAY_S` (so strips are in
flight when the pause lands) and records its runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import cv2
import faults
import numpy as np
import pytest
from conftest import REPO, synthetic, wait_for

import luminagrid
from luminagrid import broker
from luminagrid.app import use_broker
from luminagrid.lease import epoch_of
from luminagrid.local import LocalCluster, wait_for_workers
from luminagrid.settings import EVENTS_KEY, LEASE_KEY

STRIP_DELAY_S = 0.3
STRIPS = 24
#: The supervising worker is frozen for this long (3 liveness periods), Redis for this long.
WORKER_PAUSE_S = 6.0
REDIS_PAUSE_S = 5.0


@pytest.fixture(scope="module")
def _cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, Path]]:
    runs = tmp_path_factory.mktemp("runs") / "runs.log"
    env = {"PYTHONPATH": str(REPO / "tests"), "LUMINAGRID_TEST_RUNS": str(runs),
           "LUMINAGRID_TEST_STRIP_DELAY_S": str(STRIP_DELAY_S)}
    with LocalCluster(workers=2, concurrency=1, worker_env=env, worker_args=["--include", "faults"]) as c:
        yield c, runs


@pytest.fixture
def cluster(_cluster: tuple[LocalCluster, Path]) -> tuple[LocalCluster, Path]:
    c, _ = _cluster
    use_broker(c.url)
    wait_for_workers([n.name for n in c.nodes], [n.proc for n in c.nodes if n.proc])
    return _cluster


def exact(image: np.ndarray) -> np.ndarray:
    return cv2.Canny(image, 30, 90)


def starts(runs: Path, job_id: str) -> Counter[str]:
    return Counter(r["task"] for r in faults.runs(runs) if r["what"] == "start" and str(r["task"]).startswith(job_id))


def events_since(c: LocalCluster, t: float) -> list[str]:
    lines = [json.loads(raw) for raw in broker.client(c.url).lrange(EVENTS_KEY, 0, -1)]
    return [e["text"] for e in lines if e["t"] >= t]


def pid_of(token: str) -> int:
    """The main process id in a lease token `<hostname>[<pid>]#<epoch>`."""
    return int(token.rpartition("#")[0].rpartition("[")[2].rstrip("]"))


def test_the_supervising_worker_frozen_mid_job_leaves_the_output_exact_and_no_strip_run_thrice(
    cluster: tuple[LocalCluster, Path],
) -> None:
    """The worker holding the lease (its main process and its pool process: a frozen machine)
    is SIGSTOPped while one of its strips computes, for 3 liveness periods: another worker takes
    the lease under a later epoch and puts that strip back. Woken up, the old supervisor finds its
    lease gone and every write it might still try refused."""
    c, runs = cluster
    r = broker.client(c.url)
    token = wait_for(lambda: r.get(LEASE_KEY), 30, "a worker to supervise").decode()
    leader = pid_of(token)
    assert leader in {n.proc.pid for n in c.nodes if n.proc}
    image = synthetic(61, 720, 300)
    job = luminagrid.submit(image, strips=STRIPS, codec="lossless", low=30, high=90)
    doomed = wait_for(lambda: faults.unfinished(runs, job.id, faults.pool_processes(leader)), 30, "a strip to run on the supervising worker")
    frozen = {leader, *faults.pool_processes(leader)}
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        taken = wait_for(lambda: (t := r.get(LEASE_KEY)) and pid_of(t.decode()) != leader and t.decode(),
                         WORKER_PAUSE_S, "another worker to take the lease")
        time.sleep(max(0.0, WORKER_PAUSE_S - (time.monotonic() - stopped_at)))  # the rest of the pause itself
        unfinished = STRIPS - job.status().strips_done
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    result = job.wait(60, forget=False)
    events = job.status().events
    job.forget()
    runs_of = starts(runs, job.id)
    print(f"\nsupervisor {token} frozen {WORKER_PAUSE_S:g} s with strip {doomed['task']} in flight; {taken} took over; "
          f"{unfinished} strip(s) left at SIGCONT; runs per strip: max {max(runs_of.values())}, "
          f"{sum(runs_of.values())} in all; {result.republished} recovery(ies)")
    assert np.array_equal(result.edges, exact(image))
    assert unfinished > 0  # the pause hit the job in flight, and it went on after the wake-up
    assert epoch_of(taken) > epoch_of(token)  # type: ignore[operator]
    assert len(runs_of) == STRIPS and max(runs_of.values()) <= 2, runs_of
    assert runs_of[doomed["task"]] == 2, runs_of  # put back while frozen, finished by both
    assert any(f"restored task {doomed['task']}" in e for e in events), events
    assert all(n.proc and n.proc.poll() is None for n in c.nodes)


def test_redis_frozen_mid_job_declares_no_worker_lost_and_the_job_finishes_exactly(
    cluster: tuple[LocalCluster, Path],
) -> None:
    """Redis SIGSTOPped for 5 s with strips in flight: by Redis's clock every worker's liveness
    record and the lease expire meanwhile. Once it runs again, the supervisor waits for the
    workers to beat before judging them: none is declared lost, no strip is put back."""
    c, runs = cluster
    assert c.redis is not None and c.redis.proc is not None
    since = time.time()
    image = synthetic(62, 720, 300)
    job = luminagrid.submit(image, strips=STRIPS, codec="lossless", low=30, high=90)
    workers = {pid for n in c.nodes if n.proc for pid in faults.pool_processes(n.proc.pid)}
    wait_for(lambda: faults.unfinished(runs, job.id, workers), 30, "a strip to run")
    os.kill(c.redis.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(REDIS_PAUSE_S)  # the outage itself
    finally:
        os.kill(c.redis.proc.pid, signal.SIGCONT)
    resumed_at = time.monotonic()
    result = job.wait(60, forget=False)
    done_s = time.monotonic() - resumed_at
    status = job.status()
    job.forget()
    events = events_since(c, since)
    runs_of = starts(runs, job.id)
    print(f"\nRedis frozen {REDIS_PAUSE_S:g} s mid-job: done {done_s:.1f} s after SIGCONT, exact; "
          f"{status.strips_done} strips, max runs per strip {max(runs_of.values())}; events: {events}")
    assert np.array_equal(result.edges, exact(image))
    assert not [e for e in events if "is lost" in e], events
    assert done_s <= 10.0
    assert max(runs_of.values()) == 1 and result.republished == 0, (runs_of, events)
