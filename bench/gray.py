"""Gray failures, measured (issue 21): a worker that crawls, a strip that hangs, Redis or the
supervisor paused, and what speculative copies cost a healthy batch. Ratios from one run, medians.

    python bench/gray.py                                  # every scenario, 3 runs each (~6-8 minutes)
    python bench/gray.py --runs 1 --only healthy,hung     # quick
    python bench/gray.py --only straggler --runs 5 --straggler-strips 6
    python bench/gray.py --hang-timeout 30                # give up on a hung strip sooner

Setup, as issue 21 states it: each scenario starts its own Redis and a LocalCluster of 2 workers
with one pool process each (`celery -A luminagrid worker -c 1`), default settings; a deterministic
photo-like 3840x2160 gray PNG (bench/photos.py, with sensor-like noise); `--op denoise`, lossless,
the default strip count unless a scenario says otherwise. Every output is compared pixel for pixel
with `cv2.fastNlMeansDenoising` on the whole image with the op's default parameters ("exact").

The workers also import this file (`--include gray`, with LUMINAGRID_BENCH_RUNS set): each task a
pool process starts or ends appends a line to a file (Celery's task_prerun / task_postrun
signals), which is how a scenario sees a strip start (to hang it mid-run) and counts how often
each strip ran. Nothing else in the workers changes.

Scenarios (`--only`, comma-separated):
1. healthy: submit (the PNG's path) to result, the image fetched: the job's wall time.
2. straggler: one worker's pool process at 10 % speed (a thread SIGSTOPs it for 90 ms of every
   100 ms, the whole job), `--straggler-strips` (4) strips; interleaved with healthy jobs of the
   same strips in the same cluster: the ratio of medians. Issue 21: 3.0x on main; target <= 2.2x.
3. hung: once a strip has started in a pool process (its start record), that process is SIGSTOPped
   and kept stopped; seconds from the hang to the result, capped by `--hang-timeout`; then SIGCONT
   and the job is waited for again (so the cluster is clean for the next run). Target <= 10 s.
4. redis-pause: the Redis server SIGSTOPped for 5 s, 0.5 s after the job's first strip started;
   seconds from SIGCONT to the result. Target <= 10 s, exact.
5. supervisor-pause: the main process of the worker holding the supervisor lease
   (`luminagrid:supervisor`, value `name[pid]` maybe with `#epoch`) SIGSTOPped for 6 s, 0.5 s
   after the first strip started; seconds from SIGCONT to the result and the most runs of any
   strip. Target: exact, no strip more than twice.
6. overhead: batches of 10 ordinary jobs in flight at once (3 denoise gray and 3 bilateral colour
   3840x2160, 2 canny and 2 gaussian 3264x2448 colour); copies launched (`luminagrid.record.
   copies(job_id, db)`, when that module exists) x their strip's CPU / all strips' CPU. A strip's
   CPU is its job's (`JobResult.stages.worker_seconds`, decode + compute + pack) / its strips.
   Target <= 5 %. Strip runs beyond one per strip (from the run records) are reported beside it.

Every process a scenario stops (SIGSTOP) gets SIGCONT, also on failure and Ctrl-C; each scenario
stops its cluster by PID. Prints a table and writes bench/results/gray-<timestamp>.json.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

RUNS_ENV = "LUMINAGRID_BENCH_RUNS"


# --- worker side: run records (only in workers started with LUMINAGRID_BENCH_RUNS) ---------------

def _record_run(what: str, task_id: str | None, task: object) -> None:
    line = json.dumps({"what": what, "task": task_id, "name": getattr(task, "name", None),
                       "pid": os.getpid(), "t": time.time()})
    with open(os.environ[RUNS_ENV], "a") as f:
        f.write(line + "\n")


if os.environ.get(RUNS_ENV) and __name__ != "__main__":
    from celery.signals import task_postrun, task_prerun

    @task_prerun.connect(weak=False)
    def _started(task_id: str | None = None, task: object = None, **_: object) -> None:
        _record_run("start", task_id, task)

    @task_postrun.connect(weak=False)
    def _ended(task_id: str | None = None, task: object = None, state: str | None = None, **_: object) -> None:
        _record_run("end", task_id, task)


# --- the bench ------------------------------------------------------------------------------------

import argparse  # noqa: E402
import atexit  # noqa: E402
import contextlib  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from photos import noisy, photo_like  # noqa: E402

import luminagrid  # noqa: E402
from luminagrid import ops  # noqa: E402
from luminagrid import record as records  # noqa: E402
from luminagrid.local import LocalCluster  # noqa: E402
from luminagrid.settings import LEASE_KEY  # noqa: E402

SCENARIOS = ("healthy", "straggler", "hung", "redis-pause", "supervisor-pause", "overhead")
TARGETS = {
    "straggler_ratio": 2.2,  # x the healthy job with the same strips (ideal 2.0x)
    "hung_after_s": 10.0,  # from the hang to the result
    "redis_after_s": 10.0,  # from Redis's resume to the result
    "supervisor_max_runs": 2,  # runs of any one strip
    "overhead_pct": 5.0,  # copies' CPU / all strips' CPU
}
STRAGGLE_STOPPED_S, STRAGGLE_PERIOD_S = 0.090, 0.100
REDIS_PAUSE_S, SUPERVISOR_PAUSE_S = 5.0, 6.0
#: how long after the job's first strip started Redis or the supervisor is paused
PAUSE_AFTER_START_S = 0.5
#: a job that took this long despite everything is abandoned (cancelled)
JOB_TIMEOUT_S = 600.0
#: after a capped wait, how long to wait for the job once the fault is lifted
CLEANUP_WAIT_S = 90.0


# --- processes: children, CPU time, SIGSTOP/SIGCONT (always undone) --------------------------------

def children(pid: int) -> list[int]:
    """The child processes of `pid` (a worker's pool processes), from /proc."""
    out: list[int] = []
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in path.read_text().split()]
    return sorted(set(out))


def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


class Stopped:
    """Every process this bench SIGSTOPped and has not yet continued: `cont_all` (run on every exit
    path: scenario teardown, Ctrl-C, atexit) continues them all."""

    def __init__(self) -> None:
        self.pids: set[int] = set()
        self.lock = threading.Lock()

    def stop(self, pid: int) -> bool:
        with self.lock:
            self.pids.add(pid)
            try:
                os.kill(pid, signal.SIGSTOP)
                return True
            except ProcessLookupError:
                self.pids.discard(pid)
                return False

    def cont(self, pid: int) -> None:
        with self.lock:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            self.pids.discard(pid)

    def cont_all(self) -> None:
        for pid in list(self.pids):
            self.cont(pid)


STOPPED = Stopped()
atexit.register(STOPPED.cont_all)


class DutyCycle(threading.Thread):
    """Keeps the pool processes of worker main process `main_pid` stopped `stopped_s` of every
    `period_s` until `finish()`."""

    def __init__(self, main_pid: int, stopped_s: float = STRAGGLE_STOPPED_S,
                 period_s: float = STRAGGLE_PERIOD_S) -> None:
        super().__init__(name="gray-duty-cycle", daemon=True)
        self.main_pid, self.stopped_s, self.period_s = main_pid, stopped_s, period_s
        self.done = threading.Event()
        self.cycles = 0
        self.pids: set[int] = set()
        #: seconds the pool was stopped, and since the first stop: the real duty cycle
        self.stopped_total_s = 0.0
        self.began: float | None = None
        self.ended: float | None = None

    def run(self) -> None:
        try:
            while not self.done.is_set():
                pids = children(self.main_pid)  # every cycle: a pool may replace its process
                self.pids.update(pids)
                t0 = time.perf_counter()
                self.began = self.began or t0
                for pid in pids:
                    STOPPED.stop(pid)
                self.done.wait(self.stopped_s)
                for pid in pids:
                    STOPPED.cont(pid)
                self.ended = time.perf_counter()
                self.stopped_total_s += self.ended - t0
                self.cycles += 1
                self.done.wait(self.period_s - self.stopped_s)
        finally:
            for pid in self.pids:
                STOPPED.cont(pid)

    def finish(self) -> None:
        self.done.set()
        self.join(5)
        for pid in self.pids:
            STOPPED.cont(pid)

    @property
    def stopped_fraction(self) -> float | None:
        """The share of the time the pool was stopped (from the first stop to the last resume)."""
        if self.began is None or self.ended is None or self.ended <= self.began:
            return None
        return self.stopped_total_s / (self.ended - self.began)


# --- run records (written by the workers, see the top of this file) -------------------------------

class RunLog:
    """The workers' run records, read incrementally from their file."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.lines = path, 0, []
        self.lock = threading.Lock()

    def update(self) -> list[dict[str, Any]]:
        with self.lock:
            try:
                with open(self.path, "rb") as f:
                    f.seek(self.offset)
                    data = f.read()
            except FileNotFoundError:
                return list(self.lines)
            end = data.rfind(b"\n") + 1  # only whole lines; a partial one is read next time
            for raw in data[:end].splitlines():
                with contextlib.suppress(ValueError):
                    self.lines.append(json.loads(raw))
            self.offset += end
            return list(self.lines)

    def strip_runs(self, job: Any) -> dict[int, list[dict[str, Any]]]:
        """Strip index -> its "start" records (one per run), for `job`."""
        ids = {job.strip_task_id(i): i for i in range(job.strip_count)}
        out: dict[int, list[dict[str, Any]]] = {i: [] for i in range(job.strip_count)}
        for r in self.update():
            if r["what"] == "start" and r["task"] in ids:
                out[ids[r["task"]]].append(r)
        return out

    def ended(self, task_id: str, pid: int) -> bool:
        return any(r["what"] == "end" and r["task"] == task_id and r["pid"] == pid for r in self.update())


# --- speculation: copies launched -----------------------------------------------------------------

def copies_of(job_id: str) -> list[dict[str, Any]] | str:
    """The speculative copies launched for `job_id` (strip, node, reason, outcome), or why none
    could be read."""
    try:
        return [{k: c.get(k) for k in ("strip", "node", "reason", "outcome")} for c in records.copies(job_id)]
    except Exception as exc:  # noqa: BLE001 - a bench reports, it does not crash on another's bug
        return f"error: {exc!r}"


# --- a cluster per scenario, jobs ------------------------------------------------------------------

@dataclass
class Bench:
    cluster: LocalCluster
    log: RunLog
    args: argparse.Namespace
    image_path: Path
    reference: np.ndarray

    def main_pid(self, index: int) -> int:
        proc = self.cluster.nodes[index].proc
        assert proc is not None
        return proc.pid

    def node_of_pid(self, pid: int) -> str | None:
        """The worker (name) whose main process is `pid` or its parent."""
        for node in self.cluster.nodes:
            if node.proc is not None and node.proc.pid in (pid, parent_of(pid)):
                return node.name
        return None


@contextlib.contextmanager
def cluster_for(args: argparse.Namespace, image_path: Path, reference: np.ndarray) -> Iterator[Bench]:
    """A fresh Redis and 2 workers x 1 pool process, default settings, recording their runs; warmed up."""
    folder = Path(tempfile.mkdtemp(prefix="lg-gray-"))  # short: unix socket paths are limited
    log_path = folder / "runs.jsonl"
    env = {RUNS_ENV: str(log_path),
           "PYTHONPATH": os.pathsep.join(p for p in (str(BENCH), os.environ.get("PYTHONPATH", "")) if p)}
    cluster = LocalCluster(workers=2, concurrency=1, folder=folder, worker_env=env, worker_args=["--include", "gray"])
    try:
        cluster.start()
        bench = Bench(cluster, RunLog(log_path), args, image_path, reference)
        warm = noisy(cv2.cvtColor(photo_like(1920, 1080), cv2.COLOR_BGR2GRAY))
        luminagrid.submit(warm, op="denoise", codec="lossless", strips=2).wait(120)  # untimed
        yield bench
    finally:
        STOPPED.cont_all()  # never stop (SIGTERM) a stopped process: it could not act on it
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)


def quiesce(bench: Bench, timeout_s: float = 30.0) -> bool:
    """Wait until no worker holds or runs anything and nothing is unacknowledged (a run's leftovers,
    e.g. a resumed hung strip, must not slow the next run)."""
    from luminagrid import liveness  # noqa: PLC0415

    db = records.fast_client()
    deadline = time.monotonic() + timeout_s
    quiet = 0
    while time.monotonic() < deadline:
        try:
            busy = any(n.holds for n in liveness.read(db) if n.alive) or db.hlen("unacked") > 0
        except Exception:  # noqa: BLE001 - Redis just resumed: look again
            busy = True
        quiet = 0 if busy else quiet + 1
        if quiet >= 3:
            return True
        time.sleep(0.25)
    return False


@dataclass
class Outcome:
    """One job's run: what the bench saw."""

    wall_s: float | None = None  # submit to result (image fetched); None: not done
    done_at: float | None = None  # time.monotonic()
    exact: bool | None = None
    strips: int = 0
    workers: dict[str, int] = field(default_factory=dict)
    worker_cpu_s: float = 0.0
    republished: int = 0
    copies: list[dict[str, Any]] | str = ""
    runs_per_strip: list[int] = field(default_factory=list)
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def max_runs(self) -> int:
        return max(self.runs_per_strip, default=0)

    def to_json(self) -> dict[str, Any]:
        return {"wall_s": self.wall_s, "exact": self.exact, "strips": self.strips, "workers": self.workers,
                "worker_cpu_s": self.worker_cpu_s, "republished": self.republished, "copies": self.copies,
                "runs_per_strip": self.runs_per_strip, "max_runs": self.max_runs, "note": self.note, **self.extra}


def finish(bench: Bench, job: Any, result: Any, started: float, out: Outcome, reference: np.ndarray | None) -> None:
    """Fill `out` from a finished job's result (`result` None: not done), read its copies, forget it."""
    if result is not None:
        out.done_at = out.done_at or time.monotonic()
        out.wall_s = out.done_at - started
        out.workers = dict(result.workers)
        out.republished = result.republished
        out.worker_cpu_s = sum(result.stages.worker_seconds.get(k, 0.0) for k in ("decode", "compute", "pack"))
        ref = bench.reference if reference is None else reference
        out.exact = bool(result.image.shape == ref.shape and np.array_equal(result.image, ref))
    out.strips = job.strip_count
    with contextlib.suppress(Exception):
        out.copies = copies_of(job.id)


def drive(job: Any, until: Callable[[], float | None] = lambda: None,
          timeout_s: float = JOB_TIMEOUT_S) -> tuple[Any, float | None]:
    """Wait for `job` (no forgetting); stop early once `until()` returns a deadline (monotonic) that
    has passed. Returns (result or None, monotonic time it was seen done)."""
    waiter = job.waiter(timeout_s, eager=True)
    while True:
        result = waiter.step()
        if result is not None:
            return result, time.monotonic()
        deadline = until()
        if deadline is not None and time.monotonic() > deadline:
            return None, None
        time.sleep(waiter.pause_s)


def run_job(bench: Bench, source: Any = None, *, op: str = "denoise", strips: int | None = None,
            reference: np.ndarray | None = None, during: Callable[[Any, float], Callable[[], None]] | None = None,
            cap: Callable[[], float | None] | None = None) -> Outcome:
    """Submit, wait, check, clean up. `during(job, started)` starts a fault and returns what lifts
    it; `cap()` gives the deadline (monotonic) after which the wait is cut short (not done)."""
    out = Outcome()
    started = time.monotonic()
    job = luminagrid.submit(source if source is not None else bench.image_path, op=op, codec="lossless", strips=strips)
    lift: Callable[[], None] = lambda: None
    try:
        if during is not None:
            lift = during(job, started)
        try:
            result, out.done_at = drive(job, cap or (lambda: None))
        except Exception as exc:  # noqa: BLE001 - JobFailed, JobTimeout: part of what is measured
            result, out.note = None, f"{type(exc).__name__}: {exc}"
        if result is None:
            out.extra["not_done_within_cap"] = not out.note
            lift()
            with contextlib.suppress(Exception):
                out.extra["status_at_cap"] = job.status().whereabouts()
            lifted = time.monotonic()
            try:  # the job once the fault is lifted: checked too, and the cluster clean for the next run
                late, late_at = drive(job, timeout_s=CLEANUP_WAIT_S)
                ref = bench.reference if reference is None else reference
                out.exact = bool(late.image.shape == ref.shape and np.array_equal(late.image, ref))
                out.extra["done_after_lifting_s"] = late_at - lifted
            except Exception as exc:  # noqa: BLE001
                out.extra["after_lifting"] = f"{type(exc).__name__}: {exc}"
        finish(bench, job, result, started, out, reference)
    finally:
        lift()
        quiet = quiesce(bench)
        out.runs_per_strip = [len(v) for v in bench.log.strip_runs(job).values()]
        if not quiet:
            out.extra["cluster_not_quiet_after"] = True
        with contextlib.suppress(Exception):
            if out.wall_s is None:
                job.cancel(fast=True)
            job.forget()
    return out


def first_start(bench: Bench, job: Any, timeout_s: float = 60.0,
                accept: Callable[[dict[str, Any]], bool] = lambda _r: True) -> dict[str, Any] | None:
    """The first start record of one of `job`'s strips that `accept` takes; waits for it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        starts = sorted((r for runs in bench.log.strip_runs(job).values() for r in runs), key=lambda r: r["t"])
        for r in starts:
            if accept(r):
                return r
        time.sleep(0.005)
    return None


class Fault(threading.Thread):
    """A scenario's fault, in a thread of its own (its timing must not wait on Redis or the client)."""

    def __init__(self, act: Callable[[Fault], None]) -> None:
        super().__init__(name="gray-fault", daemon=True)
        self.act = act
        self.events: dict[str, float] = {}  # name -> time.monotonic()
        self.info: dict[str, Any] = {}
        self.done = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        try:
            self.act(self)
        except Exception:  # noqa: BLE001
            self.error = traceback.format_exc(limit=3)

    def mark(self, name: str) -> None:
        self.events[name] = time.monotonic()


# --- scenarios ------------------------------------------------------------------------------------

def scenario_healthy(bench: Bench, runs: int) -> dict[str, Any]:
    outs = [run_job(bench) for _ in range(runs)]
    return summarise(outs)


def scenario_straggler(bench: Bench, runs: int) -> dict[str, Any]:
    strips = bench.args.straggler_strips
    slow_main = bench.main_pid(1)
    cycles: list[dict[str, Any]] = []
    healthy: list[Outcome] = []
    slowed: list[Outcome] = []
    for r in range(runs):  # interleaved, alternating which goes first
        order = ["healthy", "straggler"]
        for name in order if r % 2 == 0 else order[::-1]:
            if name == "healthy":
                healthy.append(run_job(bench, strips=strips))
            else:
                # the duty cycle starts before the submit: the job runs under it from its start
                duty = DutyCycle(slow_main)
                duty.start()
                try:
                    slowed.append(run_job(bench, strips=strips))
                finally:
                    duty.finish()
                    cycles.append({"cycles": duty.cycles, "stopped_fraction": duty.stopped_fraction})
    h, s = summarise(healthy), summarise(slowed)
    ratio = s["median_wall_s"] / h["median_wall_s"] if h["median_wall_s"] and s["median_wall_s"] else None
    return {"strips": strips, "slow_worker": bench.cluster.nodes[1].name, "duty_cycles": cycles,
            "healthy": h, "straggler": s, "ratio": ratio, "target_ratio": TARGETS["straggler_ratio"]}


def scenario_hung(bench: Bench, runs: int) -> dict[str, Any]:
    cap_s = bench.args.hang_timeout
    outs: list[Outcome] = []
    faults: list[Fault] = []
    for _ in range(runs):
        holder: dict[str, Fault] = {}

        def during(job: Any, _started: float) -> Callable[[], None]:
            def act(f: Fault) -> None:
                tried: set[tuple[str, int]] = set()
                while not f.done.is_set():
                    r = first_start(bench, job, accept=lambda r: (r["task"], r["pid"]) not in tried)
                    if r is None:
                        f.info["error"] = "no strip started within 60 s"
                        return
                    tried.add((r["task"], r["pid"]))
                    pid = r["pid"]
                    if not STOPPED.stop(pid):
                        continue
                    f.mark("hang")
                    if bench.log.ended(r["task"], pid):  # it had finished already: not a hung strip
                        STOPPED.cont(pid)
                        del f.events["hang"]
                        continue
                    index = next(i for i in range(job.strip_count) if job.strip_task_id(i) == r["task"])
                    f.info.update(pid=pid, strip=index, worker=bench.node_of_pid(pid),
                                  hung_after_start_s=time.time() - r["t"])
                    f.info["_pid"] = pid
                    return

            fault = Fault(act)
            holder["f"] = fault
            fault.start()

            def lift() -> None:
                fault.done.set()
                fault.join(5)
                if "_pid" in fault.info:
                    STOPPED.cont(fault.info["_pid"])
            return lift

        def cap() -> float | None:
            f = holder.get("f")
            return f.events["hang"] + cap_s if f is not None and "hang" in f.events else None

        out = run_job(bench, during=during, cap=cap)
        f = holder["f"]
        hang = f.events.get("hang")
        out.extra["fault"] = {k: v for k, v in f.info.items() if not k.startswith("_")}
        out.extra["after_fault_s"] = (out.done_at - hang) if out.done_at is not None and out.wall_s and hang else None
        if hang is None:
            out.note = out.note or "the hang never happened (no strip caught running)"
        outs.append(out)
        faults.append(f)
    return summarise(outs, after="hang", cap_s=cap_s, target_after_s=TARGETS["hung_after_s"])


def pause_scenario(bench: Bench, runs: int, pick: Callable[[Bench], tuple[int, str]], pause_s: float,
                   label: str) -> list[Outcome]:
    """Runs where process `pick()` is SIGSTOPped for `pause_s`, `PAUSE_AFTER_START_S` after the
    job's first strip started; `after_fault_s` is from its SIGCONT to the result."""
    cap_s = bench.args.hang_timeout
    outs = []
    for _ in range(runs):
        holder: dict[str, Fault] = {}

        def during(job: Any, _started: float) -> Callable[[], None]:
            def act(f: Fault) -> None:
                r = first_start(bench, job)
                if r is None:
                    f.info["error"] = "no strip started within 60 s"
                    return
                time.sleep(max(0.0, PAUSE_AFTER_START_S - (time.time() - r["t"])))
                pid, who = pick(bench)
                f.info.update(pid=pid, who=who)
                f.info["_pid"] = pid
                STOPPED.stop(pid)
                f.mark("pause")
                f.done.wait(pause_s)
                STOPPED.cont(pid)
                f.mark("resume")

            fault = Fault(act)
            holder["f"] = fault
            fault.start()

            def lift() -> None:
                fault.done.set()
                fault.join(pause_s + 5)
                if "_pid" in fault.info:
                    STOPPED.cont(fault.info["_pid"])
            return lift

        def cap() -> float | None:
            f = holder.get("f")
            return f.events["resume"] + cap_s if f is not None and "resume" in f.events else None

        out = run_job(bench, during=during, cap=cap)
        f = holder["f"]
        out.extra["fault"] = {k: v for k, v in f.info.items() if not k.startswith("_")}
        if f.error:
            out.extra["fault"]["error"] = f.error
        resume, pause = f.events.get("resume"), f.events.get("pause")
        if out.wall_s is not None and out.done_at is not None and pause is not None \
                and out.done_at < (resume or math.inf):
            out.extra["done_during_pause"] = True
        out.extra["after_fault_s"] = (max(0.0, out.done_at - resume) if out.done_at is not None and out.wall_s
                                      and resume is not None else None)
        if pause is None:
            out.note = out.note or f"the {label} pause never happened"
        outs.append(out)
    return outs


def scenario_redis_pause(bench: Bench, runs: int) -> dict[str, Any]:
    def pick(b: Bench) -> tuple[int, str]:
        assert b.cluster.redis is not None and b.cluster.redis.proc is not None
        return b.cluster.redis.proc.pid, "redis-server"

    outs = pause_scenario(bench, runs, pick, REDIS_PAUSE_S, "redis")
    return summarise(outs, after="resume", cap_s=bench.args.hang_timeout, target_after_s=TARGETS["redis_after_s"],
                     pause_s=REDIS_PAUSE_S)


def lease_holder_pid(raw: bytes | str | None) -> int | None:
    """The pid in the supervisor lease's value `name[pid]` (maybe followed by `#epoch`)."""
    if raw is None:
        return None
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    match = re.search(r"\[(\d+)\]", text)
    return int(match.group(1)) if match else None


def scenario_supervisor_pause(bench: Bench, runs: int) -> dict[str, Any]:
    def pick(b: Bench) -> tuple[int, str]:
        raw = records.fast_client().get(LEASE_KEY)
        pid = lease_holder_pid(raw)
        if pid is None:
            raise RuntimeError(f"no supervisor lease to read ({LEASE_KEY} = {raw!r})")
        return pid, f"{b.node_of_pid(pid)} ({raw.decode(errors='replace') if isinstance(raw, bytes) else raw})"

    outs = pause_scenario(bench, runs, pick, SUPERVISOR_PAUSE_S, "supervisor")
    return summarise(outs, after="resume", cap_s=bench.args.hang_timeout, pause_s=SUPERVISOR_PAUSE_S,
                     target_max_runs=TARGETS["supervisor_max_runs"])


def overhead_inputs(args: argparse.Namespace, image_path: Path, reference: np.ndarray) -> list[dict[str, Any]]:
    """The batch: op, input (path or array), reference output. Each distinct input made once."""
    width, height = args.width, args.height
    colour = photo_like(width, height)
    bilateral = ops.get("bilateral")
    # 8 MP (3264x2448) beside the 3840x2160; scaled alike for other --size values
    small = photo_like(3264, 2448) if (width, height) == (3840, 2160) else \
        photo_like(width * 17 // 20, height * 17 // 15)
    canny, gaussian = ops.get("canny"), ops.get("gaussian")
    kinds = {
        "denoise": (image_path, reference),
        "bilateral": (colour, bilateral.apply(bilateral.prepare(colour), bilateral.values({}))),
        "canny": (small, canny.apply(canny.prepare(small), canny.values({}))),
        "gaussian": (small, gaussian.apply(gaussian.prepare(small), gaussian.values({}))),
    }
    order = ["denoise", "bilateral", "canny", "denoise", "gaussian",
             "bilateral", "denoise", "canny", "bilateral", "gaussian"]
    return [{"op": k, "source": kinds[k][0], "reference": kinds[k][1]} for k in order]


def scenario_overhead(bench: Bench, runs: int) -> dict[str, Any]:
    batch = overhead_inputs(bench.args, bench.image_path, bench.reference)
    batches = []
    for _ in range(runs):
        started = time.monotonic()
        jobs = [(item, luminagrid.submit(item["source"], op=item["op"], codec="lossless")) for item in batch]
        outs: list[Outcome] = []
        for item, job in jobs:
            out = Outcome()
            try:
                result, out.done_at = drive(job)
                finish(bench, job, result, started, out, item["reference"])
                out.extra["op"] = item["op"]
            except Exception as exc:  # noqa: BLE001
                out.note = f"{type(exc).__name__}: {exc}"
            outs.append(out)
        wall = time.monotonic() - started
        quiesce(bench)
        for (item, job), out in zip(jobs, outs):
            out.runs_per_strip = [len(v) for v in bench.log.strip_runs(job).values()]
            with contextlib.suppress(Exception):
                job.forget()
        cpu = sum(o.worker_cpu_s for o in outs)
        strip_cpu = [o.worker_cpu_s / o.strips if o.strips else 0.0 for o in outs]
        readable = all(isinstance(o.copies, list) for o in outs)
        copies_cpu = sum(len(o.copies) * c for o, c in zip(outs, strip_cpu)) if readable else None
        extra_cpu = sum(max(0, sum(o.runs_per_strip) - o.strips) * c for o, c in zip(outs, strip_cpu))
        batches.append({
            "wall_s": wall, "jobs": [o.to_json() for o in outs], "strips_cpu_s": cpu,
            "copies": sum(len(o.copies) for o in outs) if readable else next(
                (o.copies for o in outs if not isinstance(o.copies, list)), "n/a"),
            "copies_cpu_s": copies_cpu,
            "copies_pct": 100 * copies_cpu / cpu if copies_cpu is not None and cpu else None,
            "extra_runs": sum(max(0, sum(o.runs_per_strip) - o.strips) for o in outs),
            "extra_runs_pct": 100 * extra_cpu / cpu if cpu else None,
            "exact": all(o.exact for o in outs),
        })
    pcts = [b["copies_pct"] for b in batches if b["copies_pct"] is not None]
    return {
        "batches": batches, "median_wall_s": statistics.median(b["wall_s"] for b in batches),
        "copies_pct": statistics.median(pcts) if len(pcts) == len(batches) else None,
        "copies": [b["copies"] for b in batches],
        "extra_runs_pct": statistics.median(b["extra_runs_pct"] or 0.0 for b in batches),
        "exact": all(b["exact"] for b in batches), "target_pct": TARGETS["overhead_pct"],
        "jobs_per_batch": [item["op"] for item in batch],
    }


RUNNERS: dict[str, Callable[[Bench, int], dict[str, Any]]] = {
    "healthy": scenario_healthy, "straggler": scenario_straggler, "hung": scenario_hung,
    "redis-pause": scenario_redis_pause, "supervisor-pause": scenario_supervisor_pause, "overhead": scenario_overhead,
}


# --- summaries, table -----------------------------------------------------------------------------

def _median(values: list[float | None]) -> float | None:
    """Median with "not done" (None) counted as infinitely long; None if that is the median."""
    if not values:
        return None
    m = statistics.median(math.inf if v is None else v for v in values)
    return None if math.isinf(m) else m


def summarise(outs: list[Outcome], after: str | None = None, **extra: Any) -> dict[str, Any]:
    walls = [o.wall_s for o in outs]
    summary = {
        "runs": [o.to_json() for o in outs],
        "median_wall_s": _median(walls),
        "not_done": sum(1 for w in walls if w is None),
        "exact": all(o.exact for o in outs) if outs else None,
        "exact_count": sum(1 for o in outs if o.exact),
        "max_runs": max((o.max_runs for o in outs), default=0),
        "copies": [len(o.copies) if isinstance(o.copies, list) else o.copies for o in outs],
        **extra,
    }
    if after is not None:
        summary["after"] = after
        summary["median_after_fault_s"] = _median([o.extra.get("after_fault_s") for o in outs])
        summary["after_fault_s"] = [o.extra.get("after_fault_s") for o in outs]
    return summary


def _s(value: float | None, unit: str = " s") -> str:
    return "-" if value is None else f"{value:.2f}{unit}"


def _exact(s: dict[str, Any]) -> str:
    n = len(s.get("runs", [])) or 0
    if s.get("exact"):
        return "yes"
    return f"no ({s.get('exact_count', 0)}/{n})"


def _copies(values: list[Any]) -> str:
    if not values:
        return "-"
    if all(isinstance(v, int) for v in values):
        return ",".join(map(str, values))
    text = next(v for v in values if not isinstance(v, int))
    return "n/a" if str(text).startswith("n/a") else str(text)[:40]


def table(report: dict[str, Any]) -> list[str]:
    sc = report["scenarios"]
    healthy = (sc.get("healthy") or {}).get("median_wall_s")
    rows = [("scenario", "strips", "wall s (median)", "vs healthy", "after fault", "max runs", "copies", "exact",
             "target")]

    def vs(value: float | None, base: float | None) -> str:
        return f"{value / base:.2f}x" if value and base else "-"

    if "healthy" in sc and "error" not in sc["healthy"]:
        s = sc["healthy"]
        rows.append(("healthy", str(s["runs"][0]["strips"]), _s(s["median_wall_s"]), "1.00x", "-", str(s["max_runs"]),
                     _copies(s["copies"]), _exact(s), ""))
    if "straggler" in sc and "error" not in sc["straggler"]:
        s = sc["straggler"]
        h, g = s["healthy"], s["straggler"]
        rows.append((f"healthy ({s['strips']} strips)", str(s["strips"]), _s(h["median_wall_s"]), "1.00x", "-",
                     str(h["max_runs"]), _copies(h["copies"]), _exact(h), ""))
        rows.append(("straggler (1 pool at 10 %)", str(s["strips"]), _s(g["median_wall_s"]),
                     f"{s['ratio']:.2f}x" if s["ratio"] else "-", "-", str(g["max_runs"]), _copies(g["copies"]),
                     _exact(g), f"<= {TARGETS['straggler_ratio']}x (ideal 2.0x; main: 3.0x)"))
    for name, label, target in (
        ("hung", "hung pool process", f"<= {TARGETS['hung_after_s']:g} s after the hang"),
        ("redis-pause", f"Redis paused {REDIS_PAUSE_S:g} s", f"<= {TARGETS['redis_after_s']:g} s after resume"),
        ("supervisor-pause", f"supervisor paused {SUPERVISOR_PAUSE_S:g} s",
         f"exact, max runs <= {TARGETS['supervisor_max_runs']}"),
    ):
        if name not in sc or "error" in sc[name]:
            continue
        s = sc[name]
        n, cap = len(s["runs"]), s["cap_s"]
        after = s["median_after_fault_s"]
        not_done = sum(1 for v in s["after_fault_s"] if v is None)
        during = sum(1 for r in s["runs"] if r.get("done_during_pause"))
        after_text = (f"not done within {cap:g} s" if after is None else _s(after)) + (
            f" ({not_done}/{n} not done)" if not_done and after is not None else "") + (
            f" ({during}/{n} done during the pause: 0)" if during else "")
        wall = s["median_wall_s"]
        wall_text = _s(wall) if wall is not None else "not done"
        rows.append((label, str(s["runs"][0]["strips"]), wall_text, vs(wall, healthy), after_text,
                     str(s["max_runs"]), _copies(s["copies"]), _exact(s), target))
    if "overhead" in sc and "error" not in sc["overhead"]:
        s = sc["overhead"]
        pct = s["copies_pct"]
        copies = s["copies"]
        no_speculation = any(str(c).startswith("n/a") for c in copies)
        copies_text = (f"{pct:.1f} % of strip CPU" if pct is not None else
                       "n/a (no speculation in this build)" if no_speculation else str(copies[0]))
        rows.append((f"overhead: batch of {len(s['jobs_per_batch'])} jobs", "-", _s(s["median_wall_s"]), "-",
                     f"extra runs {s['extra_runs_pct']:.1f} % CPU", "-", copies_text, "yes" if s["exact"] else "no",
                     f"copies <= {TARGETS['overhead_pct']:g} % of strip CPU"))
    for name, s in sc.items():
        if "error" in s:
            rows.append((name, "-", "ERROR", "-", "-", "-", "-", "-", s["error"].strip().splitlines()[-1][:60]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


# --- main -----------------------------------------------------------------------------------------

def make_input(width: int, height: int, folder: Path) -> tuple[Path, np.ndarray, dict[str, Any]]:
    """The deterministic photo-like gray PNG (noise seed 0), and the reference: fastNlMeansDenoising
    of the whole image with the op's default parameters, as `luminagrid.ops.denoise` calls it."""
    gray = noisy(cv2.cvtColor(photo_like(width, height), cv2.COLOR_BGR2GRAY))
    path = folder / f"gray-{width}x{height}.png"
    cv2.imwrite(str(path), gray)
    assert np.array_equal(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), gray)
    values = ops.get("denoise").values({})
    h, t, s = float(values["h"]), int(values["template_window"]), int(values["search_window"])
    started = time.perf_counter()
    reference = cv2.fastNlMeansDenoising(gray, None, h, t, s)
    call = {"call": f"cv2.fastNlMeansDenoising(gray, None, {h:g}, {t}, {s})",
            "in_process_s": time.perf_counter() - started, "opencv_threads": cv2.getNumThreads()}
    return path, reference, call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs per scenario (medians)")
    parser.add_argument("--only", default=",".join(SCENARIOS), help=f"comma-separated: {', '.join(SCENARIOS)}")
    parser.add_argument("--hang-timeout", type=float, default=60.0,
                        help="seconds after a fault to wait for the result before calling it not done")
    parser.add_argument("--straggler-strips", type=int, default=4)
    parser.add_argument("--size", default="3840x2160", help="WIDTHxHEIGHT of the gray input (issue 21: 3840x2160)")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    args = parser.parse_args()
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    args.width, args.height = (int(v) for v in args.size.lower().split("x"))
    # SIGTERM (and SIGINT, even where a shell started this with it ignored) end the run cleanly:
    # every stopped process continued, every cluster stopped by PID.
    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt()

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"gray-{stamp}.json"
    report: dict[str, Any] = {
        "when": stamp, "runs": args.runs, "only": chosen, "hang_timeout_s": args.hang_timeout,
        "setup": {"workers": 2, "pool_processes_each": 1, "op": "denoise", "codec": "lossless", "mode": "gray",
                  "size": [args.width, args.height], "settings": "defaults", "straggler_strips": args.straggler_strips,
                  "straggler_duty": f"stopped {STRAGGLE_STOPPED_S * 1000:g} ms of every "
                                    f"{STRAGGLE_PERIOD_S * 1000:g} ms",
                  "redis_pause_s": REDIS_PAUSE_S, "supervisor_pause_s": SUPERVISOR_PAUSE_S,
                  "pause_after_first_start_s": PAUSE_AFTER_START_S},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "opencv": cv2.__version__,
                    "load_avg_at_start": os.getloadavg()},
        "scenarios": {},
    }
    with contextlib.suppress(Exception):  # the code measured: its commit, and whether it had changes
        git = ["git", "-C", str(REPO)]
        report["code"] = {
            "commit": subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
            "changed": bool(subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                                           capture_output=True, text=True).stdout.strip()),
        }
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lg-gray-in-") as tmp:
        image_path, reference, call = make_input(args.width, args.height, Path(tmp))
        report["setup"]["reference"] = call
        try:
            for name in [s for s in SCENARIOS if s in chosen]:
                t0 = time.monotonic()
                print(f"[{time.monotonic() - started:6.1f} s] {name} ...", flush=True)
                try:
                    with cluster_for(args, image_path, reference) as bench:
                        report["scenarios"][name] = RUNNERS[name](bench, args.runs)
                except KeyboardInterrupt:
                    raise
                except Exception:  # noqa: BLE001 - one scenario's failure is reported, the others still run
                    report["scenarios"][name] = {"error": traceback.format_exc()}
                    print(report["scenarios"][name]["error"], file=sys.stderr)
                report["scenarios"][name]["seconds"] = time.monotonic() - t0
                json_path.write_text(json.dumps(report, indent=2, default=str))
        finally:
            STOPPED.cont_all()
            report["total_s"] = time.monotonic() - started
            report["machine"]["load_avg_at_end"] = os.getloadavg()
            report["table"] = table(report)
            json_path.write_text(json.dumps(report, indent=2, default=str))
    print(f"\ngray failures: denoise gray {args.width}x{args.height}, lossless, 2 workers x 1 pool process, "
          f"medians of {args.runs} run(s); 'after fault': from the hang / the resume to the result")
    print("\n".join(report["table"]))
    print(f"\ntotal {report['total_s']:.0f} s; JSON: {json_path}")


if __name__ == "__main__":
    main()
