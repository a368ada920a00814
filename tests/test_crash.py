"""Crash-proofing with real processes: SIGKILLed pool processes and workers, Redis restarts.

These workers load `tests/faults.py`: every strip sleeps a little (so it can be killed mid-run)
and records its runs; a strip starting with `faults.POISON` kills its own process every time.
Every test shows that its fault hit work in flight: the killed run never ended, the strip ran
again in another process, and Redis restarted before the job finished.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import faults
import numpy as np
import pytest
from conftest import REPO, synthetic, wait_for
from faults import POISON
from outages import REDIS_ARGS, Outages

import luminagrid
from luminagrid import jobs
from luminagrid import record as records
from luminagrid.app import app, use_broker
from luminagrid.errors import JobFailed
from luminagrid.local import LocalCluster, LocalWorker, celery_env, spawn, wait_for_workers
from luminagrid.settings import Settings

DEFAULTS = Settings()
STRIP_DELAY_S = 0.15
#: A strip whose pool process dies runs again after this (`tasks._RETRY`, default_retry_delay).
RETRY_DELAY_S = 1.0
SOAK_JOBS = int(os.environ.get("LUMINAGRID_SOAK_JOBS", "10"))
REDIS_RESTARTS = int(os.environ.get("LUMINAGRID_REDIS_RESTARTS", "10"))


RUNS = Path(os.environ.get("TMPDIR", "/tmp")) / f"lg-runs-{os.getpid()}.log"


def faulty_cluster(max_deliveries: int = 3, worker_args: list[str] | None = None, workers: int = 2) -> LocalCluster:
    """Workers at default settings (visibility timeout, liveness), with faults and run records."""
    return LocalCluster(
        workers=workers, concurrency=2, appendonly=True, redis_args=REDIS_ARGS,
        worker_env={
            "LUMINAGRID_MAX_DELIVERIES": str(max_deliveries),
            "LUMINAGRID_TEST_STRIP_DELAY_S": str(STRIP_DELAY_S),
            "LUMINAGRID_TEST_RUNS": str(RUNS),
            "LUMINAGRID_INLINE_MAX_BYTES": "0",
            "PYTHONPATH": str(REPO / "tests"),
        },
        worker_args=["--include", "faults", *(worker_args or [])],
    )


@pytest.fixture(scope="module", autouse=True)
def _runs_file() -> Iterator[None]:
    RUNS.unlink(missing_ok=True)
    yield
    RUNS.unlink(missing_ok=True)


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


def running(job: jobs.Job, pids: set[int] | None = None) -> dict | None:
    """A run of one of the job's strips that started and has not ended (in one of `pids`)."""
    return faults.unfinished(RUNS, job.id, pids)


def landed(doomed: dict, killed_at: float) -> dict:
    """Proof that a kill hit a run in flight: it never ended, and the strip ran again elsewhere,
    as a retry. Returns the run after the kill."""
    runs = faults.runs(RUNS, doomed["task"])
    assert not [r for r in runs if r["what"] == "end" and r["pid"] == doomed["pid"] and r["t"] >= doomed["t"]]
    again = [r for r in runs if r["what"] == "start" and r["t"] > killed_at]
    assert again and again[0]["pid"] != doomed["pid"], runs
    return again[0]


def hit_a_strip(pid: int, killed_at: float, runs: list[dict]) -> bool:
    """Whether the kill of `pid` at `killed_at` hit a strip in flight: the last strip that process
    started before the kill has no "end" (a killed process never writes one)."""
    starts = [r for r in runs if r["what"] == "start" and r["pid"] == pid and r["t"] <= killed_at]
    if not starts:
        return False
    last = starts[-1]
    return not [r for r in runs if r["what"] == "end" and r["pid"] == pid and r["task"] == last["task"] and r["t"] >= last["t"]]


def print_worker_logs(c: LocalCluster, lines: int = 40) -> None:
    """The last lines of every worker's log: what a failed crash test needs to be diagnosed."""
    for node in c.nodes:
        if node.log_path is not None and node.log_path.exists():
            tail = node.log_path.read_text(errors="replace").splitlines()[-lines:]
            print(f"--- {node.name} (exit {node.proc.poll() if node.proc else None}) ---", *tail, sep="\n")


def test_a_pool_process_killed_mid_strip_is_rerun_and_the_output_stays_exact(faulty: LocalCluster) -> None:
    image = synthetic(31, 400, 333)
    job = luminagrid.submit(image, strips=8, codec="lossless", low=30, high=90)
    doomed = wait_for(lambda: running(job), 30, "a strip to start")
    os.kill(doomed["pid"], signal.SIGKILL)
    killed_at = time.time()
    result = job.wait(60)
    again = landed(doomed, killed_at)
    redone_s = again["t"] - killed_at
    print(f"\nstrip {doomed['task']} ran again {redone_s:.2f} s after its process was SIGKILLed "
          f"(pid {doomed['pid']} -> {again['pid']}, retry {again['retries']})")
    assert np.array_equal(result.edges, exact(image))
    assert again["retries"] >= 1 and redone_s >= RETRY_DELAY_S  # a counted retry, after its delay
    assert all(n.proc is not None and n.proc.poll() is None for n in faulty.nodes)


def test_a_whole_worker_killed_mid_job_is_survived_within_seconds(faulty: LocalCluster) -> None:
    victim = faulty.add_worker(f"victim@{os.uname().nodename}", concurrency=2)
    try:
        wait_for_workers([victim.name], [victim.proc])
        image = synthetic(32, 600, 301)
        job = luminagrid.submit(image, strips=12, codec="lossless", low=30, high=90)
        doomed = wait_for(lambda: running(job, set(faults.pool_processes(victim.proc.pid))), 30, "a strip to start on the victim")
        os.killpg(victim.proc.pid, signal.SIGKILL)  # the worker and its pool processes
        killed_at = time.time()
        result = job.wait(60)
        recovery_s = time.time() - killed_at
    finally:
        victim.stop()
        faulty.nodes.remove(victim)
    again = landed(doomed, killed_at)
    print(f"\njob done {recovery_s:.2f} s after its worker was SIGKILLed; the lost strip ran again after "
          f"{again['t'] - killed_at:.2f} s (liveness period {DEFAULTS.liveness_ttl_s:g} s, "
          f"visibility timeout {DEFAULTS.visibility_timeout_s} s)")
    assert np.array_equal(result.edges, exact(image))
    assert again["t"] - killed_at <= 5.0


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
    # Not three times on one worker: a strip that killed its process somewhere goes where it never did.
    assert all(n.name in message for n in faulty.nodes), message
    # Exactly LUMINAGRID_MAX_DELIVERIES deliveries, each killing its process, none finishing.
    runs = faults.runs(RUNS, job.strip_task_id(1))
    starts = [r for r in runs if r["what"] == "start"]
    assert len(starts) == 3 and len({r["pid"] for r in starts}) == 3 and [r["retries"] for r in starts] == [0, 1, 2]
    assert not [r for r in runs if r["what"] == "end"]
    assert all(not Path(f"/proc/{r['pid']}").exists() for r in starts)
    # The workers stayed up and still compute.
    assert [n.proc.pid for n in faulty.nodes if n.proc and n.proc.poll() is None] == pids_before
    healthy = synthetic(34, 100, 100)
    assert np.array_equal(luminagrid.submit(healthy, strips=3, codec="lossless", low=30, high=90).wait(30).edges,
                          exact(healthy))


def test_a_sick_worker_that_kills_every_strip_fails_no_job(faulty: LocalCluster) -> None:
    """A third worker whose every strip kills its pool process (out of memory, a broken library):
    each strip it killed is retried on a worker where it never did, so no innocent strip reaches
    LUMINAGRID_MAX_DELIVERIES, and the job is exact."""
    assert faulty.folder is not None
    sick = LocalWorker(f"sick@{os.uname().nodename}", faulty.url, 1, log_path=faulty.folder / "sick.log",
                       extra_env={**faulty.worker_env, "LUMINAGRID_TEST_KILL_EVERY_STRIP": "1"},
                       extra_args=faulty.worker_args).start()
    try:
        assert sick.proc is not None
        wait_for_workers([sick.name], [sick.proc])
        image = synthetic(37, 240, 200)
        job = luminagrid.submit(image, strips=8, codec="lossless", low=30, high=90)
        result = job.wait(90, forget=False)
        died = {i: records.kills(job.id, i) for i in range(job.strip_count)}
        job.forget()
    finally:
        sick.stop()
    killed = {i: d for i, d in died.items() if d}
    print(f"\na sick worker among 3: strips whose process it killed {sorted(killed)}; job exact")
    assert killed and all(set(d) == {sick.name} for d in killed.values()), died  # it hit strips, only there
    assert np.array_equal(result.edges, exact(image))


def test_jobs_survive_repeated_redis_restarts_and_crashes(faulty: LocalCluster) -> None:
    """Redis stopped, or crashed losing its last second of writes, at a random point of each job:
    while it is published, or once a random number of its strips started (each computes for
    STRIP_DELAY_S, so the job is still in flight)."""
    assert faulty.redis is not None
    rng = random.Random(35)
    outages = Outages(faulty.redis)
    timings = []
    try:
        for n in range(REDIS_RESTARTS):
            image = synthetic(100 + n, 360, 250)
            count = rng.randint(2, 9)
            after = rng.randint(0, count)  # strips started first; 0: while publishing
            how = ("stop", "crash")[n % 2]
            box: dict[str, object] = {}

            def restart() -> None:
                try:
                    outage()
                except BaseException as exc:  # noqa: BLE001 - handed to the test
                    box["error"] = exc
                    faulty.redis.start() if faulty.redis.proc is None or faulty.redis.proc.poll() is not None else None

            def outage() -> None:
                while after and ("job" not in box or len({r["task"] for r in faults.runs(RUNS) if r["what"] == "start"
                                                          and str(r["task"]).startswith(box["job"])}) < after):  # type: ignore[arg-type]
                    time.sleep(0.005)
                box["down_at"] = time.monotonic()
                outages.down(how)
                outages.up()
            restarter = threading.Thread(target=restart, daemon=True)
            started = time.monotonic()
            restarter.start()
            try:
                job = luminagrid.submit(image, strips=count, codec="lossless", low=30, high=90)
                box["job"] = job.id
                result = job.wait(120)
                done_at = time.monotonic()
            finally:
                restarter.join(60)
            if "error" in box:
                raise box["error"]  # type: ignore[misc]
            timings.append(done_at - started)
            where = f"once {after} of {count} strips started" if after else "while publishing"
            assert np.array_equal(result.edges, exact(image)), f"restart {n} ({how}) {where}"
            assert box["down_at"] < done_at, f"restart {n} ({how}, {where}) came after the job finished"  # type: ignore[operator]
    finally:
        outages.close()
    print(f"\n{REDIS_RESTARTS} jobs, one Redis stop or crash each, during the job: slowest {max(timings):.1f} s, "
          f"median {sorted(timings)[len(timings) // 2]:.1f} s")


class DeployedWorker(LocalWorker):
    """A worker started as docker-compose.yml starts one: at INFO, with gossip and mingle (which
    `LocalWorker` turns off), so a test meets what a deployment logs."""

    def start(self) -> DeployedWorker:
        args = [sys.executable, "-m", "celery", "-A", "luminagrid", "worker", "--hostname", self.name,
                "--concurrency", str(self.concurrency), "--pool", "prefork", "--loglevel", "INFO", *self.extra_args]
        self.proc = spawn(args, self.log_path, celery_env(self.broker_url, self.extra_env))
        return self


#: Long enough that a worker's consumer restarts while Redis is still down (a restart that is
#: over before the worker notices shows nothing).
OUTAGE_S = 1.0


def test_a_redis_restart_under_busy_workers_leaves_no_traceback_in_their_logs() -> None:
    """Redis stopped, then killed, while strips compute on workers started as deployed: every job
    stays exact, and the workers' logs (through their shutdown) hold no traceback: no "Error on
    restarting Gossip: AttributeError(... 'connection_errors')", no CRITICAL "Couldn't ack"
    (`workarounds._consumer_steps_close_without_a_connection`, `._a_lost_ack_is_one_line`)."""
    with faulty_cluster(workers=0) as c:
        assert c.redis is not None and c.folder is not None
        use_broker(c.url)
        for i in range(2):
            node = DeployedWorker(f"deployed{i + 1}@{os.uname().nodename}", c.url, 2, log_path=c.folder / f"deployed{i + 1}.log",
                                  extra_env=c.worker_env, extra_args=c.worker_args)
            c.nodes.append(node.start())
        wait_for_workers([n.name for n in c.nodes], [n.proc for n in c.nodes if n.proc])
        names = sorted(n.name for n in c.nodes)
        def pinged() -> list[str]:
            return sorted(name for reply in app.control.ping(timeout=1.0) for name in reply)

        assert pinged() == names  # on a pooled connection, used before the outages
        outages = Outages(c.redis)
        try:
            for n, how in enumerate(("stop", "crash", "stop", "crash")):
                image = synthetic(400 + n, 400, 250)
                job = luminagrid.submit(image, strips=8, codec="lossless", low=30, high=90)
                wait_for(lambda: running(job), 30, "a strip to start")  # noqa: B023 - used at once
                outages.down(how)
                time.sleep(OUTAGE_S)
                outages.up()
                assert np.array_equal(job.wait(120).edges, exact(image)), f"restart {n} ({how})"
            # Broadcasts (ping, inspect, Flower's refresh) go out on that connection, broken by the
            # restarts: `workarounds._broadcasts_survive_a_redis_restart` sends them again, so this
            # raises no "Broken pipe"; it waits only for workers still resubscribing.
            wait_for(lambda: pinged() == names, 30, "both workers to answer a ping")
        except BaseException:
            print_worker_logs(c)
            raise
        finally:
            outages.close()
        for node in c.nodes:
            node.stop()
        logs = {n.name: n.log_path.read_text(errors="replace") for n in c.nodes if n.log_path}
    assert all("Connection to broker lost" in text for text in logs.values())  # every worker met the outages
    for name, text in logs.items():
        at = max(text.find("Traceback"), text.find("connection_errors"))
        assert at < 0, f"{name}:\n{text[max(0, at - 300):at + 3000]}"
        assert "Couldn't ack" not in text or "the broker connection is lost" in text


def test_a_consumer_step_stops_cleanly_after_its_connection_was_dropped() -> None:
    """The gossip error above, without the timing it needs in a real worker (the gossip channel
    must have its Redis client cached, and Redis must still be down, as the consumer restarts):
    Celery set `c.connection = None`, and closing the step's channel fails with a connection error."""
    import redis  # noqa: PLC0415
    from celery import bootsteps  # noqa: PLC0415

    class Channel:
        def close(self) -> None:
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    class Consumer:
        channel = Channel()

        def cancel(self) -> None:
            raise redis.ConnectionError("Connection closed by server.")

    class Parent:  # what Celery's worker consumer keeps across reconnects
        connection = None
        connection_errors = (redis.ConnectionError,)
        channel_errors = ()

    step = bootsteps.ConsumerStep.__new__(bootsteps.ConsumerStep)
    step.consumers = [Consumer()]
    step.stop(Parent())  # no AttributeError: 'NoneType' object has no attribute 'connection_errors'
    step.shutdown(Parent())


def test_soak_jobs_complete_exactly_under_random_sigkills_and_redis_outages() -> None:
    """Three jobs in flight at a time while a killer SIGKILLs random pool processes (half the time
    one running a strip) and Redis is stopped or crashed every few seconds; a third and two thirds
    of the way in, a whole worker (main process and pool) is killed and replaced. The run records count the kills that hit a
    strip in flight (the killed process started one and never ended it): at least one must have."""
    with faulty_cluster(max_deliveries=50) as c:
        use_broker(c.url)
        assert c.redis is not None
        outages = Outages(c.redis)
        rng = random.Random(36)
        stop = threading.Event()
        kills = {"pool": 0, "worker": 0, "redis": 0}
        killed: list[tuple[int, float]] = []  # (pid, when) of every pool process killed, alone or with its worker

        # Only workers that finished starting are targets: Celery gives up on a worker whose pool
        # process dies during start-up ("Could not start worker processes"), and a supervisor
        # restarts it in production (README); that is not what this test is about.
        ready = list(c.nodes)

        def live_nodes() -> list:
            return [n for n in ready if n.proc and n.proc.poll() is None]

        def computing() -> set[int]:
            """PIDs with a strip started and not ended (run records)."""
            runs = faults.runs(RUNS)
            ended = {(r["task"], r["pid"]) for r in runs if r["what"] == "end"}
            return {r["pid"] for r in runs if r["what"] == "start" and (r["task"], r["pid"]) not in ended}

        def kill_pool_processes() -> None:
            while not stop.wait(rng.uniform(0.2, 0.6)):
                children = [p for n in live_nodes() for p in faults.pool_processes(n.proc.pid)]
                # Half the kills aim at a process with a strip in flight (if any): most pool
                # processes are idle at any instant, and a kill of an idle one tests little.
                busy = [p for p in children if p in computing()]
                if children:
                    try:
                        pid = rng.choice(busy if busy and rng.random() < 0.5 else children)
                        os.kill(pid, signal.SIGKILL)
                        killed.append((pid, time.time()))
                        kills["pool"] += 1
                    except ProcessLookupError:
                        pass

        def kill_a_worker() -> None:
            node = rng.choice(live_nodes())
            pool = faults.pool_processes(node.proc.pid)
            os.killpg(node.proc.pid, signal.SIGKILL)
            killed.extend((pid, time.time()) for pid in pool)
            kills["worker"] += 1
            node = c.add_worker(f"replacement{kills['worker']}@{os.uname().nodename}")
            wait_for_workers([node.name], [node.proc])
            ready.append(node)

        def restart_redis() -> None:
            while not stop.wait(rng.uniform(3.0, 6.0)):
                outages.down(rng.choice(("stop", "crash")))
                time.sleep(rng.uniform(0.5, 2.0))  # the outage itself
                outages.up()
                kills["redis"] += 1

        threads = [threading.Thread(target=kill_pool_processes, daemon=True), threading.Thread(target=restart_redis, daemon=True)]
        for thread in threads:
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
                        assert np.array_equal(job.wait(180).edges, exact(img)), job.id
                    pending = []
        except BaseException:
            print_worker_logs(c)
            raise
        finally:
            stop.set()
            for thread in threads:
                thread.join()
            outages.close()
        runs = faults.runs(RUNS)
        hits = [(pid, at) for pid, at in killed if hit_a_strip(pid, at, runs)]
        print(f"\n{SOAK_JOBS} jobs exact under {kills['pool']} pool-process and {kills['worker']} worker SIGKILLs "
              f"and {kills['redis']} Redis stops or crashes in {time.monotonic() - started:.0f} s; "
              f"{len(hits)} of {len(killed)} killed pool processes were running a strip")
        assert kills["pool"] > 0 and kills["worker"] == 2 and kills["redis"] > 0
        assert hits, "no kill hit a strip in flight: the soak tested idle processes only"
