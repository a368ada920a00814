"""A node's watch over its own pool processes: how each running strip progresses, and stopping one.

The liveness beat (`liveness.Beat`, in the worker's main process) calls `Warden.measure` every
beat. For each strip running in a pool process it reports, from the operating system (psutil),
not from the process itself, which may be stopped or stuck in native code:
- `cpu_s`: CPU seconds the process spent since it took the strip;
- `run_s`: wall seconds since it took it;
- `idle_s`: wall seconds since its CPU time (or the bytes it read or wrote) last grew. A process stopped by a signal, blocked
  forever, or deadlocked does not grow it; one that crawls (throttled, swapping, starved) grows
  it slowly, and is told apart by its rate;
- `rate`: CPU seconds per wall second over about the last `RATE_WINDOW_S` (a process that just
  began to crawl shows it at once, not diluted by its fast start).
The supervisor judges these (`speculation.py`) and may order the node to stop a process (a
strip's copy elsewhere finished first, or it hung): `Warden.stop` SIGKILLs it if it still runs
that task. When the other copy's result is stored, Celery finds it and acknowledges the message
without a retry; otherwise (a job that failed, a one-worker cluster) Celery retries the strip as
for any lost pool process. billiard starts a new pool process in its place.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import psutil

log = logging.getLogger(__name__)
#: CPU growth below this between two beats does not count as progress, in seconds.
CPU_EPSILON_S = 0.005
#: The recent rate is measured over at least this long, in seconds.
RATE_WINDOW_S = 1.0


@dataclass(frozen=True)
class Measure:
    """How one running strip progresses in its pool process."""

    pid: int
    run_s: float
    cpu_s: float
    idle_s: float
    rate: float


@dataclass
class _Track:
    started_at: float  # time.time() when the process took the task (Celery's `time_start`)
    cpu0_s: float  # the process's CPU time before it took the task
    last_cpu_s: float
    last_moved: int  # bytes read and written when last seen
    advanced_at: float  # time.time() when its CPU time (or its I/O) last grew
    #: (time.time(), CPU seconds) at recent beats, oldest first, spanning about `RATE_WINDOW_S`
    samples: list[tuple[float, float]]


def _work(pid: int) -> tuple[float, int] | None:
    """The process's CPU seconds and the bytes it read and wrote (files and sockets alike: a strip
    that waits on a slow network read is not hung); None if it is gone, or dead and not yet reaped
    (a killed pool process is Celery's to retry, not a hang)."""
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            if process.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                return None
            times = process.cpu_times()
            try:
                io = process.io_counters()
                moved = int(getattr(io, "read_chars", io.read_bytes) + getattr(io, "write_chars", io.write_bytes))
            except (psutil.Error, OSError, AttributeError):
                moved = 0
    except (psutil.Error, OSError):
        return None
    return float(times.user + times.system), moved


class Warden:
    """Measures this node's running strips (one call per beat) and stops processes on order."""

    def __init__(self) -> None:
        self._tracks: dict[tuple[str, int], _Track] = {}
        #: each pool process's CPU time at the last beat (the baseline of the next task it takes)
        self._last_cpu: dict[int, float] = {}

    def measure(self, running: Iterable[Any]) -> dict[str, Measure]:
        """Task id -> its measure, for Celery requests running in a pool process now."""
        now = time.time()
        out: dict[str, Measure] = {}
        tracks: dict[tuple[str, int], _Track] = {}
        for request in running:
            pid, started = getattr(request, "worker_pid", None), getattr(request, "time_start", None)
            if not pid or not started:
                continue
            work = _work(pid)
            if work is None:
                continue
            cpu, moved = work
            key = (str(request.id), int(pid))
            track = self._tracks.get(key)
            if track is None:  # first seen running: its CPU before is the process's at the last beat
                cpu0 = self._last_cpu.get(pid, cpu)
                track = _Track(float(started), cpu0, cpu, moved, float(started), [(float(started), cpu0)])
            if cpu - track.last_cpu_s >= CPU_EPSILON_S or moved != track.last_moved:
                track.advanced_at, track.last_cpu_s, track.last_moved = now, cpu, moved
            track.samples.append((now, cpu))
            while len(track.samples) > 2 and now - track.samples[1][0] >= RATE_WINDOW_S:
                track.samples.pop(0)
            (t0, c0) = track.samples[0]
            tracks[key] = track
            self._last_cpu[pid] = cpu
            out[key[0]] = Measure(pid=pid, run_s=max(0.0, now - track.started_at), cpu_s=max(0.0, cpu - track.cpu0_s),
                                  idle_s=max(0.0, now - track.advanced_at),
                                  rate=max(0.0, cpu - c0) / (now - t0) if now - t0 > 0 else 1.0)
        self._tracks = tracks
        children = _children()
        for pid in children:  # idle pool processes too: the baseline of the next task each takes
            if pid not in {k[1] for k in tracks}:
                work = _work(pid)
                if work is not None:
                    self._last_cpu[pid] = work[0]
        self._last_cpu = {pid: cpu for pid, cpu in self._last_cpu.items() if pid in set(children)}
        return out

    def stop(self, orders: dict[str, dict[str, Any]], running: Callable[[], Iterable[Any]]) -> list[str]:
        """Carry out the supervisor's stop orders (task id -> {"pid", "reason"}): SIGKILL each pool
        process that still runs the task it names (`running()` reads the requests running now, just
        before each kill: a process that moved on to another task is left alone). Returns the task
        ids whose process was stopped."""
        stopped = []
        for task_id, order in orders.items():
            pid = order.get("pid")
            by_id = {(str(r.id), getattr(r, "worker_pid", None)): r for r in running()}
            request = by_id.get((task_id, pid))
            if request is None or not isinstance(pid, int):
                continue  # it ended meanwhile, or another process runs it now
            try:
                os.kill(pid, signal.SIGKILL)  # a stopped (SIGSTOP) or stuck process obeys only this
            except OSError:
                continue
            log.warning("warden: stopped pool process %d running %s: %s", pid,
                        getattr(request, "argsrepr", None) or task_id, order.get("reason", "ordered by the supervisor"))
            stopped.append(task_id)
        return stopped


def _children() -> list[int]:
    try:
        return [c.pid for c in psutil.Process(os.getpid()).children()]
    except (psutil.Error, OSError):
        return []
