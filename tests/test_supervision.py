"""Supervision inside the cluster, at default settings: Redis outages at every phase of a job,
lost workers in seconds, long strips never run twice, jobs that outlive their submitter, cancel.

The workers load `tests/faults.py`: a test arms one phase of a job, the first process to get
there holds and says so, the test stops or crashes Redis, lets the process go on into the
outage, and starts Redis again. Every job must come out exact.
"""

from __future__ import annotations

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
import faults
import numpy as np
import pytest
from conftest import CLI, REPO, synthetic, wait_for
from outages import REDIS_ARGS, Outages

import luminagrid
from luminagrid import broker, claims, jobs
from luminagrid import record as records
from luminagrid.app import app, use_broker
from luminagrid.errors import JobCancelled, JobFailed
from luminagrid.local import LocalCluster, LocalWorker, wait_for_workers
from luminagrid.settings import ACTIVE_JOBS_KEY, LEASE_KEY, QUEUE, Settings

DEFAULTS = Settings()
#: How long Redis stays down in each phase (the issue asks for 1-5 s).
DOWN_S = {"publish": 1.0, "take": 2.0, "run": 3.0, "store": 1.0, "join": 2.0, "stitch": 5.0, "collect": 1.0}


def exact(image: np.ndarray) -> np.ndarray:
    return cv2.Canny(image, 30, 90)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("holds")


@pytest.fixture(scope="module")
def _phased(folder: Path) -> Iterator[tuple[LocalCluster, Outages]]:
    env = {
        "PYTHONPATH": str(REPO / "tests"),
        "LUMINAGRID_TEST_HOLD_DIR": str(folder),
        "LUMINAGRID_TEST_RUNS": str(folder / "runs.log"),
        "LUMINAGRID_INLINE_MAX_BYTES": "0",  # every payload and output a claim check, through the outages
    }
    with pytest.MonkeyPatch.context() as patch:
        # The client's own phases (publish, collect) hold in this process.
        patch.setenv("LUMINAGRID_TEST_HOLD_DIR", str(folder))
        patch.setenv("LUMINAGRID_INLINE_MAX_BYTES", "0")
        with LocalCluster(workers=2, concurrency=1, appendonly=True, redis_args=REDIS_ARGS, worker_env=env,
                          worker_args=["--include", "faults"]) as c:
            assert c.redis is not None
            outages = Outages(c.redis)
            try:
                yield c, outages
            finally:
                outages.close()


@pytest.fixture
def phased(_phased: tuple[LocalCluster, Outages]) -> tuple[LocalCluster, Outages]:
    c, _ = _phased
    use_broker(c.url)
    wait_for_workers([n.name for n in c.nodes], [n.proc for n in c.nodes if n.proc])
    return _phased


def print_logs(c: LocalCluster, lines: int = 60) -> None:
    """The last lines of every worker's log and Redis's: what a failed test needs to be diagnosed."""
    assert c.folder is not None
    for log in sorted(c.folder.glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        print(f"--- {log.name} ---", *tail, sep="\n")


def in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


@pytest.mark.parametrize("how", ["stop", "crash"])
@pytest.mark.parametrize("phase", faults.PHASES)
def test_redis_stopped_or_crashed_at_any_phase_of_a_job_changes_nothing_in_its_output(
    phased: tuple[LocalCluster, Outages], folder: Path, phase: str, how: str,
) -> None:
    c, outages = phased
    image = synthetic(300 + faults.PHASES.index(phase), 360, 240)
    faults.arm(folder, phase)
    done: dict[str, float] = {}

    def submit_and_wait() -> jobs.JobResult:
        job = luminagrid.submit(image, strips=6, codec="lossless", low=30, high=90)
        result = job.wait(120)
        done["at"] = time.monotonic()
        return result

    thread, box = in_thread(submit_and_wait)
    try:
        held = wait_for(lambda: faults.reached(folder, phase), 60, f"a process to reach phase {phase}")
        down_at = time.monotonic()
        outages.down(how)
    finally:
        faults.release(folder, phase)  # it goes on, into the outage (or, if the test failed, away)
    time.sleep(DOWN_S[phase])  # the outage itself
    outages.up()
    up_at = time.monotonic()
    thread.join(150)
    if thread.is_alive() or "error" in box:
        print_logs(c)
    assert not thread.is_alive(), "the job did not finish"
    if "error" in box:
        raise box["error"]
    assert np.array_equal(box["value"].edges, exact(image))
    assert done["at"] > down_at  # the outage hit the job in flight
    print(f"\nphase {phase} ({'worker' if held.get('pid') != os.getpid() else 'client'} pid {held.get('pid')}), "
          f"Redis {how} for {DOWN_S[phase]:g} s: job exact, done {done['at'] - up_at:.1f} s after Redis was back")


def _submitter_killed_at(phase: str, c: LocalCluster, folder: Path, tmp_path: Path,
                         image: np.ndarray) -> tuple[jobs.Job, float]:
    """Run a submitter of `image` (8 strips) in a process of its own and SIGKILL it at `phase`."""
    np.save(tmp_path / "image.npy", image)
    code = (f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r}); import faults, numpy, luminagrid; "
            f"luminagrid.submit(numpy.load({str(tmp_path / 'image.npy')!r}), strips=8, codec='lossless', low=30, high=90)")
    env = {**os.environ, "LUMINAGRID_BROKER_URL": c.url, "LUMINAGRID_TEST_HOLD_DIR": str(folder)}
    faults.arm(folder, phase)
    submitter = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO)
    try:
        held = wait_for(lambda: faults.reached(folder, phase), 60, f"the submitter to reach {phase!r}")
    finally:
        submitter.kill()
        submitter.wait(30)
    faults.release(folder, phase)
    job = jobs.Job.find(held["task"].rsplit(".strip", 1)[0])
    assert job.record.state == records.PUBLISHING
    return job, time.monotonic()


def test_a_submitter_sigkilled_after_its_last_payload_leaves_a_job_the_cluster_finishes(
    phased: tuple[LocalCluster, Outages], folder: Path, tmp_path: Path,
) -> None:
    """Killed before its last strip message: every payload is in Redis, so the supervisor
    publishes what is missing once the submitter's key has lapsed."""
    c, _ = phased
    image = synthetic(310, 320, 200)
    job, killed_at = _submitter_killed_at("last-publish", c, folder, tmp_path, image)
    result = job.wait(120, forget=False)
    events = job.status().events
    job.forget()
    print(f"\nsubmitter SIGKILLed before its last strip message: job done, exact, {time.monotonic() - killed_at:.1f} s later")
    assert np.array_equal(result.edges, exact(image))
    assert any("its submitter stopped while publishing" in e for e in events), events


def test_a_submitter_sigkilled_mid_read_fails_its_job_clearly_within_seconds(
    phased: tuple[LocalCluster, Outages], folder: Path, tmp_path: Path,
) -> None:
    """Killed after 2 of 8 strips: the rest of the image never reached Redis. The job fails with
    a message that says so, the strips it did send are skipped, their payloads freed."""
    c, _ = phased
    job, killed_at = _submitter_killed_at("publish", c, folder, tmp_path, synthetic(312, 320, 200))
    with pytest.raises(JobFailed) as failure:
        job.wait(60, forget=False)
    took_s = time.monotonic() - killed_at
    print(f"\nsubmitter SIGKILLed after 2 of 8 strips: job failed {took_s:.1f} s later")
    assert "its submitter stopped after sending 2 of 8 strips" in str(failure.value)
    assert "submit the image again" in str(failure.value)
    status = job.status()
    assert status.state == "failed" and "its submitter stopped" in (status.error or "")
    assert not broker.client(c.url).exists(*(claims.key_for(job.id, "in", i) for i in range(8)))
    job.forget()


def test_ctrl_c_while_the_cli_still_reads_and_sends_the_image_cancels_what_went_out(
    phased: tuple[LocalCluster, Outages], folder: Path, tmp_path: Path,
) -> None:
    c, _ = phased
    path = tmp_path / "photo.png"
    cv2.imwrite(str(path), synthetic(313, 320, 200))
    code = (f"import runpy, sys; sys.path.insert(0, {str(REPO / 'tests')!r}); import faults; "
            f"sys.argv = ['cli.py', 'submit', {str(path)!r}, '--strips', '8']; "
            f"runpy.run_path({str(REPO / 'cli.py')!r}, run_name='__main__')")
    env = {**os.environ, "LUMINAGRID_BROKER_URL": c.url, "LUMINAGRID_TEST_HOLD_DIR": str(folder)}
    faults.arm(folder, "publish")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        held = wait_for(lambda: faults.reached(folder, "publish"), 60, "the submitter to publish 2 strips")
        proc.send_signal(signal.SIGINT)  # while 6 strips are still to be read and sent
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait(30)
        faults.release(folder, "publish")
    job_id = held["task"].rsplit(".strip", 1)[0]
    assert proc.returncode == 130, stderr
    assert f"cancelled job {job_id} (photo.png): its strips are skipped and its data deleted" in stderr
    assert json.loads(broker.client(c.url).get(records.key(job_id)))["state"] == records.CANCELLED
    wait_for(lambda: not leftovers(c, job_id), 30, "the cancelled job's data to be deleted")
    assert not path.with_name("photo.edges.png").exists()


def test_a_job_cancelled_while_its_submitter_still_publishes_stays_cancelled(
    phased: tuple[LocalCluster, Outages], folder: Path,
) -> None:
    c, _ = phased
    image = synthetic(311, 320, 200)
    faults.arm(folder, "publish")
    thread, box = in_thread(lambda: luminagrid.submit(image, strips=8, codec="lossless", low=30, high=90).wait(60))
    try:
        held = wait_for(lambda: faults.reached(folder, "publish"), 60, "the submitter to publish 2 strips")
        job_id = held["task"].rsplit(".strip", 1)[0]
        jobs.Job.find(job_id).cancel()  # from "another machine", while 6 strips are still to be sent
    finally:
        faults.release(folder, "publish")
    thread.join(90)
    assert isinstance(box.get("error"), JobCancelled), box
    client = broker.client(c.url)
    assert json.loads(client.get(records.key(job_id)))["state"] == records.CANCELLED
    assert client.zscore(ACTIVE_JOBS_KEY, job_id) is None
    wait_for(lambda: not leftovers(c, job_id), 30, "the cancelled job's data to be deleted")


# --- lost workers, long strips ------------------------------------------------------------------

SLOW_STRIP_S = 0.4


@pytest.fixture(scope="module")
def _slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, Path]]:
    """Two workers at default settings whose strips take `SLOW_STRIP_S` each, recording their runs."""
    runs = tmp_path_factory.mktemp("runs") / "runs.log"
    env = {"PYTHONPATH": str(REPO / "tests"), "LUMINAGRID_TEST_RUNS": str(runs),
           "LUMINAGRID_TEST_STRIP_DELAY_S": str(SLOW_STRIP_S)}
    with LocalCluster(workers=2, concurrency=1, appendonly=True, worker_env=env, worker_args=["--include", "faults"]) as c:
        yield c, runs


@pytest.fixture
def slow(_slow: tuple[LocalCluster, Path]) -> tuple[LocalCluster, Path]:
    c, _ = _slow
    use_broker(c.url)
    live = [n for n in c.nodes if n.proc and n.proc.poll() is None]
    wait_for_workers([n.name for n in live], [n.proc for n in live if n.proc])
    return _slow


def test_a_worker_sigkilled_mid_strip_costs_seconds_not_a_visibility_timeout(slow: tuple[LocalCluster, Path]) -> None:
    """At default settings (visibility timeout 3600 s), the lost worker's strip runs again within
    5 s of the kill, in another process, and the job is exact."""
    c, runs = slow
    assert Settings.from_env().visibility_timeout_s == DEFAULTS.visibility_timeout_s == 3600
    victim = c.add_worker(f"victim@{os.uname().nodename}")
    try:
        assert victim.proc is not None
        wait_for_workers([victim.name], [victim.proc])
        image = synthetic(41, 480, 300)
        job = luminagrid.submit(image, strips=12, codec="lossless", low=30, high=90)
        doomed = wait_for(lambda: faults.unfinished(runs, job.id, faults.pool_processes(victim.proc.pid)), 30, "a strip to run on the victim")
        os.killpg(victim.proc.pid, signal.SIGKILL)  # the worker and its pool: a lost node
        killed_at = time.time()
        again = wait_for(lambda: [r for r in faults.runs(runs, doomed["task"]) if r["what"] == "start" and r["t"] > killed_at],
                         30, "the lost strip to run again")[0]
        result = job.wait(60)
        done_s = time.time() - killed_at
    finally:
        victim.stop()
        c.nodes.remove(victim)
    assert np.array_equal(result.edges, exact(image))
    assert not [r for r in faults.runs(runs, doomed["task"]) if r["what"] == "end" and r["pid"] == doomed["pid"]]
    assert again["pid"] != doomed["pid"]
    rerun_s = again["t"] - killed_at
    print(f"\nworker SIGKILLed mid-strip at default settings: strip {doomed['task']} ran again {rerun_s:.2f} s "
          f"after the kill (pid {doomed['pid']} -> {again['pid']}); job done {done_s:.2f} s after the kill")
    assert rerun_s <= 5.0
    assert result.republished >= 1  # the supervisor put it back, not kombu's hour-long sweep


def test_the_supervising_worker_sigkilled_hands_supervision_over_within_seconds(tmp_path: Path) -> None:
    """The worker that holds the supervisor's lease is lost too: another takes the lease over and
    recovers the lost worker's strip; `workers` lists the lost worker as lost."""
    runs = tmp_path / "runs.log"
    env = {"PYTHONPATH": str(REPO / "tests"), "LUMINAGRID_TEST_RUNS": str(runs),
           "LUMINAGRID_TEST_STRIP_DELAY_S": str(SLOW_STRIP_S)}
    with LocalCluster(workers=2, concurrency=1, worker_env=env, worker_args=["--include", "faults"]) as c:
        use_broker(c.url)
        r = broker.client(c.url)
        leader = wait_for(lambda: r.get(LEASE_KEY), 30, "a worker to supervise").decode()
        victim = next(n for n in c.nodes if leader.startswith(f"{n.name}["))
        assert victim.proc is not None
        image = synthetic(43, 480, 300)
        job = luminagrid.submit(image, strips=12, codec="lossless", low=30, high=90)
        doomed = wait_for(lambda: faults.unfinished(runs, job.id, faults.pool_processes(victim.proc.pid)), 30, "a strip to run on the supervisor")
        os.killpg(victim.proc.pid, signal.SIGKILL)
        killed_at = time.time()
        result = job.wait(60)
        again = [x for x in faults.runs(runs, doomed["task"]) if x["what"] == "start" and x["t"] > killed_at][0]
        new_leader = r.get(LEASE_KEY).decode()
        listing = cli(["workers"], c).stdout
    assert np.array_equal(result.edges, exact(image))
    print(f"\nthe supervising worker SIGKILLed mid-strip: {new_leader} supervises now; the strip ran again "
          f"{again['t'] - killed_at:.2f} s after the kill")
    assert new_leader != leader and again["t"] - killed_at <= 5.0
    assert any(victim.name in line and "lost: last beat" in line for line in listing.splitlines()), listing


def test_a_long_strip_restored_from_a_lost_worker_is_restored_once(slow: tuple[LocalCluster, Path]) -> None:
    """The restored message keeps its delivery tag: the lost worker's last holdings must not make
    it look lost again while another worker runs it."""
    c, runs = slow
    assert c.folder is not None
    long_env = {**c.worker_env, "LUMINAGRID_TEST_STRIP_DELAY_S": "4"}
    host = os.uname().nodename
    others = [n.name for n in c.nodes]
    app.control.cancel_consumer(QUEUE, destination=others, reply=True)
    victim = LocalWorker(f"doomed@{host}", c.url, 1, log_path=c.folder / "doomed.log", extra_env=long_env,
                         extra_args=c.worker_args).start()
    heir = LocalWorker(f"heir@{host}", c.url, 1, log_path=c.folder / "heir.log", extra_env=long_env, extra_args=c.worker_args)
    try:
        assert victim.proc is not None
        wait_for_workers([victim.name], [victim.proc])
        image = synthetic(44, 64, 200)
        job = luminagrid.submit(image, strips=1, codec="lossless", low=30, high=90)
        doomed = wait_for(lambda: faults.unfinished(runs, job.id, faults.pool_processes(victim.proc.pid)), 30, "the strip to run on the victim")
        heir.start()
        assert heir.proc is not None
        wait_for_workers([heir.name], [heir.proc])
        os.killpg(victim.proc.pid, signal.SIGKILL)
        result = job.wait(60, forget=False)
        events = job.status().events
        job.forget()
    finally:
        app.control.add_consumer(QUEUE, destination=others, reply=True)
        victim.stop()
        heir.stop()
    assert np.array_equal(result.edges, exact(image))
    starts = [r for r in faults.runs(runs, doomed["task"]) if r["what"] == "start"]
    restores = [e for e in events if "restored task" in e]
    print(f"\na 4 s strip of a lost worker: {len(starts)} runs, {len(restores)} restore(s)")
    assert len(starts) == 2 and len(restores) == 1, (starts, events)


def test_a_strip_that_runs_longer_than_the_liveness_period_is_never_run_twice(slow: tuple[LocalCluster, Path]) -> None:
    c, runs = slow
    long_s = 3 * DEFAULTS.liveness_ttl_s
    assert c.folder is not None
    patient = LocalWorker(f"patient@{os.uname().nodename}", c.url, 2, log_path=c.folder / "patient.log",
                          extra_env={**c.worker_env, "LUMINAGRID_TEST_STRIP_DELAY_S": str(long_s)},
                          extra_args=c.worker_args).start()
    others = [n.name for n in c.nodes]
    app.control.cancel_consumer(QUEUE, destination=others, reply=True)  # only the patient worker computes
    try:
        assert patient.proc is not None
        wait_for_workers([patient.name], [patient.proc])
        image = synthetic(42, 64, 200)
        started = time.time()
        result = luminagrid.submit(image, strips=2, codec="lossless", low=30, high=90).wait(60)
        took_s = time.time() - started
    finally:
        app.control.add_consumer(QUEUE, destination=others, reply=True)
        patient.stop()
    assert np.array_equal(result.edges, exact(image))
    starts = Counter(r["task"] for r in faults.runs(runs) if r["what"] == "start" and r["t"] >= started)
    print(f"\n2 strips of {long_s:g} s each (liveness period {DEFAULTS.liveness_ttl_s:g} s): runs {dict(starts)}, {took_s:.1f} s")
    assert sorted(starts.values()) == [1, 1] and took_s >= long_s
    assert result.republished == 0


# --- jobs that outlive their submitter; status; cancel --------------------------------------------

def cli(args: list[str], c: LocalCluster, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LUMINAGRID_BROKER_URL": c.url}
    env.pop("LUMINAGRID_RESULT_BACKEND", None)
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout_s)


def cli_process(args: list[str], c: LocalCluster) -> subprocess.Popen[str]:
    env = {**os.environ, "LUMINAGRID_BROKER_URL": c.url}
    env.pop("LUMINAGRID_RESULT_BACKEND", None)
    return subprocess.Popen([*CLI, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def job_in_redis(c: LocalCluster, image: Path, state: str = records.RUNNING) -> str | None:
    """The id of the job of `image` (by its output path) whose record in Redis is in `state`, if any."""
    r = broker.client(c.url)
    for key in r.scan_iter("luminagrid:job:*"):
        raw = r.get(key)
        record = json.loads(raw) if raw else {}
        if record.get("state") == state and str(record.get("output", "")).startswith(str(image.with_suffix(""))):
            return key.decode().split(":")[-1]
    return None


def photo(tmp_path: Path, seed: int, height: int = 400, width: int = 300) -> tuple[Path, np.ndarray]:
    path = tmp_path / f"photo{seed}.png"
    image = synthetic(seed, height, width)
    cv2.imwrite(str(path), image)
    return path, image


def test_detach_prints_a_line_per_image_and_result_collects_each_from_another_process(
    slow: tuple[LocalCluster, Path], tmp_path: Path,
) -> None:
    c, _ = slow
    (a, image_a), (b, image_b) = photo(tmp_path, 51), photo(tmp_path, 52, 200, 160)
    started = time.monotonic()
    proc = cli(["submit", str(a), str(b), "--detach", "--codec", "lossless", "--low", "30", "--high", "90",
                "--out-dir", str(tmp_path / "out")], c)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2
    for line, path, image in zip(lines, (a, b), (image_a, image_b)):
        word, job_id, source, arrow, out = line.split()
        assert (word, source, arrow) == ("job", str(path), "->") and out == str(tmp_path / "out" / f"{path.stem}.edges.png")
        assert not Path(out).exists()  # detached: nothing written yet
        collected = cli(["result", job_id], c)
        assert collected.returncode == 0, collected.stderr
        assert np.array_equal(cv2.imread(out, cv2.IMREAD_UNCHANGED), exact(image))
    print(f"\n2 images detached and collected in {time.monotonic() - started:.1f} s")


def test_detach_refuses_embedded_mode(tmp_path: Path) -> None:
    path, _ = photo(tmp_path, 53, 64, 64)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUMINAGRID_")}
    proc = subprocess.run([*CLI, "submit", str(path), "--detach", "--embedded"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "--detach leaves the job to the cluster, but embedded mode stops its workers" in proc.stderr
    assert "LUMINAGRID_BROKER_URL" in proc.stderr and not path.with_name(f"{path.stem}.edges.png").exists()


def test_a_job_completes_after_its_submitter_is_sigkilled_then_redis_restarts_and_a_worker_dies(
    slow: tuple[LocalCluster, Path], tmp_path: Path,
) -> None:
    c, runs = slow
    assert c.redis is not None
    path, image = photo(tmp_path, 54, 640, 300)
    victim = c.add_worker(f"victim2@{os.uname().nodename}")
    try:
        assert victim.proc is not None
        wait_for_workers([victim.name], [victim.proc])
        submitter = cli_process(["submit", str(path), "--codec", "lossless", "--strips", "16", "--low", "30", "--high", "90"], c)
        job_id = wait_for(lambda: job_in_redis(c, path), 60, "the job to be published")
        submitter.kill()  # SIGKILL: nobody waits for the job any more
        submitter.communicate(timeout=30)
        c.redis.restart()  # with AOF: queued and unacknowledged messages survive, reserved ones are dropped
        doomed = wait_for(lambda: faults.unfinished(runs, job_id, faults.pool_processes(victim.proc.pid)), 60, "a strip to run on the victim")
        os.killpg(victim.proc.pid, signal.SIGKILL)
    finally:
        victim.stop()
        c.nodes.remove(victim)
    collected = cli(["result", job_id], c)
    assert collected.returncode == 0, collected.stderr
    out = path.with_name(f"{path.stem}.edges.png")
    assert np.array_equal(cv2.imread(str(out), cv2.IMREAD_UNCHANGED), exact(image))
    assert [r for r in faults.runs(runs, doomed["task"]) if r["what"] == "start" and r["pid"] != doomed["pid"]]
    print(f"\n{collected.stdout.strip()}")


def test_status_says_where_each_unfinished_strip_is_and_workers_shows_liveness(
    slow: tuple[LocalCluster, Path], tmp_path: Path,
) -> None:
    c, _ = slow
    path, image = photo(tmp_path, 55, 960, 200)
    proc = cli(["submit", str(path), "--detach", "--codec", "lossless", "--strips", "40", "--low", "30", "--high", "90"], c)
    job_id = proc.stdout.split()[1]

    def status_with_holders() -> str | None:
        out = cli(["status", job_id], c).stdout
        return out if "(alive" in out and ": queued" in out else None
    text = wait_for(status_with_holders, 30, "status to show strips held and strips queued", poll_s=0.1)
    assert f"job {job_id}: running |" in text
    held = [line for line in text.splitlines() if "held by" in line]
    assert held and all("/40: held by local" in line and "@" in line for line in held), text
    workers = cli(["workers"], c)
    assert workers.returncode == 0, workers.stderr
    for node in c.nodes:
        line = next(line for line in workers.stdout.splitlines() if node.name in line)
        assert "beat" in line and "s ago" in line
    assert cli(["result", job_id], c).returncode == 0
    assert np.array_equal(cv2.imread(str(path.with_name(f"{path.stem}.edges.png")), cv2.IMREAD_UNCHANGED), exact(image))


def leftovers(c: LocalCluster, job_id: str) -> list[str]:
    """The job's data still in Redis (its record and cancel mark do not count)."""
    keep = {f"luminagrid:job:{job_id}", f"luminagrid:cancel:{job_id}"}
    return sorted(k.decode() for k in broker.client(c.url).keys(f"*{job_id}*") if k.decode() not in keep)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_on_a_waiting_submit_cancels_its_job(
    slow: tuple[LocalCluster, Path], tmp_path: Path, sig: signal.Signals,
) -> None:
    c, runs = slow
    path, _ = photo(tmp_path, 56, 960, 200)
    proc = cli_process(["submit", str(path), "--codec", "lossless", "--strips", "40"], c)
    job_id = wait_for(lambda: job_in_redis(c, path), 60, "the job to be published")
    wait_for(lambda: [r for r in faults.runs(runs) if r["task"] and r["task"].startswith(job_id)], 30, "a strip to start")
    proc.send_signal(sig)
    cancelled_at = time.time()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert f"cancelled job {job_id} ({path.name}): its strips are skipped and its data deleted" in stderr
    status = cli(["status", job_id], c)
    assert status.returncode == 0 and f"job {job_id}: cancelled" in status.stdout
    wait_for(lambda: not leftovers(c, job_id), 30, "the cancelled job's data to be deleted")
    started = [r for r in faults.runs(runs) if r["what"] == "start" and str(r["task"]).startswith(job_id)]
    late = [r for r in started if r["t"] > cancelled_at + SLOW_STRIP_S + 1]
    print(f"\n{len(started)} of 40 strips started before the cancel took effect; {len(late)} after")
    assert len(started) < 40 and not late
    assert not path.with_name(f"{path.stem}.edges.png").exists()


def test_cancel_stops_a_detached_job_from_any_machine_and_refuses_what_it_cannot_cancel(
    slow: tuple[LocalCluster, Path], tmp_path: Path,
) -> None:
    c, _ = slow
    path, image = photo(tmp_path, 57, 960, 200)
    job_id = cli(["submit", str(path), "--detach", "--codec", "lossless", "--strips", "40"], c).stdout.split()[1]
    proc = cli(["cancel", job_id], c)
    assert proc.returncode == 0 and proc.stdout.strip() == f"cancelled job {job_id}: its strips are skipped and its data deleted"
    assert f"job {job_id}: cancelled" in cli(["status", job_id], c).stdout
    collected = cli(["result", job_id], c)
    assert collected.returncode == 1 and f"job {job_id} was cancelled" in collected.stderr
    wait_for(lambda: not leftovers(c, job_id), 30, "the cancelled job's data to be deleted")
    again = cli(["cancel", job_id], c)
    assert again.returncode == 0 and f"job {job_id} was already cancelled" in again.stdout

    unknown = cli(["cancel", "no-such-job"], c)
    assert unknown.returncode == 1 and "error: no job 'no-such-job'" in unknown.stderr

    small, small_image = photo(tmp_path, 58, 64, 64)
    done_id = cli(["submit", str(small), "--detach", "--codec", "lossless", "--low", "30", "--high", "90"], c).stdout.split()[1]
    wait_for(lambda: "done" in cli(["status", done_id], c).stdout, 30, "the small job to finish")
    finished = cli(["cancel", done_id], c)
    assert finished.returncode == 1
    assert f"error: job {done_id} has already finished; nothing to cancel" in finished.stderr
    assert cli(["result", done_id], c).returncode == 0  # still collectable
    assert np.array_equal(cv2.imread(str(small.with_name(f"{small.stem}.edges.png")), cv2.IMREAD_UNCHANGED), exact(small_image))


# --- small jobs beside big ones -----------------------------------------------------------------

def test_a_small_job_submitted_behind_a_big_one_is_not_queued_behind_its_strips(
    slow: tuple[LocalCluster, Path],
) -> None:
    """First in, first out, the 640x480 job would wait for all 40 strips of the 6 MP job (8 s
    on these two workers); at its job size's priority it is taken as soon as a worker is free."""
    c, _ = slow
    big_image, small_image = synthetic(320, 2000, 3000), synthetic(321, 480, 640)
    big = luminagrid.submit(big_image, strips=40, codec="lossless", low=30, high=90)
    wait_for(lambda: big.status().strips_done >= 2, 60, "the big job to be under way")
    small = luminagrid.submit(small_image, codec="lossless", low=30, high=90)
    small_result = small.wait(60)
    unfinished = 40 - big.status().strips_done
    print(f"\nthe 640x480 job finished while the big job still had {unfinished} of 40 strips to do")
    assert unfinished >= 20, unfinished
    assert np.array_equal(small_result.edges, exact(small_image))
    assert np.array_equal(big.wait(120).edges, exact(big_image))


def test_strips_are_queued_at_their_job_sizes_priority(slow: tuple[LocalCluster, Path]) -> None:
    """The priority lists kombu takes from lowest first, as `queues` reads them."""
    from luminagrid import queues

    assert [queues.priority_for(p) for p in (640 * 480, 4_000_000, 4_000_001, 33_177_600, 10**9)] == [0, 0, 3, 3, 9]
    assert queues.lists_of(QUEUE) == [QUEUE, f"{QUEUE}\x06\x163", f"{QUEUE}\x06\x166", f"{QUEUE}\x06\x169"]
    c, _ = slow
    client = broker.client(c.url)
    app.control.cancel_consumer(QUEUE, reply=True)
    try:
        job = luminagrid.submit(synthetic(322, 2000, 2100), strips=3, codec="lossless", low=30, high=90)
        wait_for(lambda: queues.queued_count(client, QUEUE) == 3, 30, "the 3 strips to be queued")
        assert client.llen(QUEUE) == 0 and client.llen(f"{QUEUE}\x06\x163") == 3
        assert queues.find_queued(client, QUEUE, set(job.record.task_ids)) == {job.record.strip_task_id(i) for i in range(3)}
    finally:
        app.control.add_consumer(QUEUE, reply=True)
    job.wait(60)
