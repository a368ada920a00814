"""Fault injection, loaded only into the crash tests' workers (`--include faults`) and the tests
that drive them. Never shipped.

Strip faults apply to every operation's strip compute, built in or from an installed package
(each registered operation's `compute` is wrapped: `_wrap_operations`):
- `LUMINAGRID_TEST_STRIP_DELAY_S`: every strip first computes (burns CPU) this long, so a test can
  kill it mid-run. Not a sleep: a strip whose process uses no CPU for `LUMINAGRID_STALL_S` is hung
  (`luminagrid.speculation`), and a long strip is one that works.
- A strip whose first own row begins with `POISON` SIGKILLs its pool process, on every delivery:
  an input that always kills its worker (a gray row's first bytes; a colour row's first B, G, R,
  B, ... values). One whose first own row begins with `HANG` blocks its process (no CPU) for good,
  on every delivery: an input that hangs every worker it visits. On a worker with
  `LUMINAGRID_TEST_KILL_EVERY_STRIP` set every strip SIGKILLs its pool process: a sick worker.
- `LUMINAGRID_TEST_RUNS`: a file every strip run appends to ("start"/"end", task id, pid, retries,
  operation), so a test can prove that its fault hit a run in flight and that the strip ran again.
- `LUMINAGRID_TEST_HOLD_DIR`: phase holds. A test arms one phase (`arm`); the first process to get
  there writes `<phase>.reached` and waits until the test writes `<phase>.release`, so the test can
  stop Redis exactly then. Phases (`PHASES`), in a job's order: `publish` (the client, after 2
  strips; `last-publish`, not in `PHASES`: before its last strip message), `take` (a worker took a strip off the queue, not yet recorded as unacknowledged),
  `run` (a strip computing), `store` (a strip about to store its result), `join` (about to join
  the chord), `stitch` (the stitch computing), `collect` (the client about to read the result).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
from celery import current_task
from celery.signals import after_task_publish, before_task_publish
from kombu.transport import redis as kombu_redis

from luminagrid import jobs, ops
from luminagrid.backend import PollingRedisBackend, strip_of
from luminagrid.ops.canny import Canny
from luminagrid.strips import Strip

POISON = np.array([13, 37, 13, 37, 13, 37, 13, 37], np.uint8)
HANG = np.array([42, 7, 42, 7, 42, 7, 42, 7], np.uint8)
PHASES = ("publish", "take", "run", "store", "join", "stitch", "collect")
HOLD_TIMEOUT_S = 120.0


# --- phase holds ------------------------------------------------------------------------------

def _hold_dir() -> Path | None:
    raw = os.environ.get("LUMINAGRID_TEST_HOLD_DIR")
    return Path(raw) if raw else None


def hold(phase: str, **info: Any) -> None:
    """If `phase` is armed and nobody reached it yet: say so, and wait for the release."""
    folder = _hold_dir()
    if folder is None:
        return
    try:
        if (folder / "armed").read_text() != phase:
            return
        fd = os.open(folder / f"{phase}.reached", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except OSError:
        return  # not armed, or another process got there first
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "t": time.time(), **info}, f)
    deadline = time.monotonic() + HOLD_TIMEOUT_S
    while not (folder / f"{phase}.release").exists() and time.monotonic() < deadline:
        time.sleep(0.01)


def arm(folder: Path, phase: str) -> None:
    for stale in folder.glob("*.reached"):
        stale.unlink()
    for stale in folder.glob("*.release"):
        stale.unlink()
    (folder / "armed").write_text(phase)


def reached(folder: Path, phase: str) -> dict[str, Any] | None:
    path = folder / f"{phase}.reached"
    try:
        text = path.read_text()
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None


def release(folder: Path, phase: str) -> None:
    (folder / f"{phase}.release").write_text("go")
    (folder / "armed").write_text("")


def busy(seconds: float) -> None:
    """Use `seconds` of CPU time (a strip that computes this long: stopped or starved, it takes longer)."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


# --- run records --------------------------------------------------------------------------------

def _record_run(what: str, op: str | None = None) -> None:
    path = os.environ.get("LUMINAGRID_TEST_RUNS")
    if not path:
        return
    request = current_task.request if current_task else None
    line = json.dumps({"what": what, "task": getattr(request, "id", None), "pid": os.getpid(),
                       "retries": getattr(request, "retries", 0), "t": time.time(), "op": op})
    with open(path, "a") as f:
        f.write(line + "\n")


def pool_processes(pid: int) -> set[int]:
    """The child processes of worker main process `pid`: its pool processes."""
    try:
        return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


def unfinished(path: Path, job_id: str, pids: set[int] | None = None) -> dict[str, Any] | None:
    """A run of one of job `job_id`'s strips that started and has not ended (in one of `pids`)."""
    records = runs(path)
    ended = {(r["task"], r["pid"]) for r in records if r["what"] == "end"}
    for r in records:
        if r["what"] == "start" and str(r["task"]).startswith(job_id) and (r["task"], r["pid"]) not in ended \
                and (pids is None or r["pid"] in pids):
            return r
    return None


def runs(path: Path, task_id: str | None = None) -> list[dict[str, Any]]:
    """The run records of `task_id` (or all), in order."""
    if not path.exists():
        return []
    out = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in out if task_id is None or r["task"] == task_id]


# --- the patches --------------------------------------------------------------------------------

def poisoned(pixels: np.ndarray, strip: Strip, marker: np.ndarray = POISON) -> bool:
    """Whether the strip's first own row begins with `marker` (gray: its first pixels; colour: its
    first pixels' B, G, R values in a row)."""
    first = np.asarray(pixels[strip.halo_top]).reshape(-1)[: marker.size]
    return np.array_equal(first, marker)


def _faulty(op: ops.Operation) -> Any:
    """`op.compute` with the strip faults around it: run records, the delay, POISON, the `run` hold."""
    compute = op.compute

    def faulty_compute(pixels: np.ndarray, strip: Strip, height: int, values: Any) -> Any:
        _record_run("start", op.name)
        busy(float(os.environ.get("LUMINAGRID_TEST_STRIP_DELAY_S", "0")))
        if poisoned(pixels, strip) or os.environ.get("LUMINAGRID_TEST_KILL_EVERY_STRIP"):
            os.kill(os.getpid(), signal.SIGKILL)
        if poisoned(pixels, strip, HANG):
            time.sleep(10 * HOLD_TIMEOUT_S)  # blocked, using no CPU, until its process is killed
        hold("run", task=getattr(current_task.request, "id", None) if current_task else None)
        result = compute(pixels, strip, height, values)
        _record_run("end", op.name)
        return result

    faulty_compute.faults_wrapped = True  # type: ignore[attr-defined]
    return faulty_compute


def _wrap_operations() -> None:
    """Every registered operation (built in, and every plugin `luminagrid.ops` loaded from its
    entry point when it was imported) computes its strips through `_faulty`: an instance
    attribute over its class's `compute`, once per operation."""
    for op in ops.REGISTRY.values():
        if not getattr(op.__dict__.get("compute"), "faults_wrapped", False):
            op.compute = _faulty(op)  # type: ignore[method-assign]


_wrap_operations()

_original_append = kombu_redis.QoS.append


def _append(self: Any, message: Any, delivery_tag: str) -> None:
    if (message.headers or {}).get("task") == "luminagrid.strip":
        hold("take", task=message.headers.get("id"))
    _original_append(self, message, delivery_tag)


kombu_redis.QoS.append = _append

_original_store = PollingRedisBackend._store


def _store(self: Any, key: Any, value: Any, expires: Any, state: Any) -> None:
    name = key.decode() if isinstance(key, bytes) else str(key)
    if state == "SUCCESS" and strip_of(name.removeprefix("celery-task-meta-")) is not None:
        hold("store", key=name)
    _original_store(self, key, value, expires, state)


PollingRedisBackend._store = _store

_original_join = PollingRedisBackend.on_chord_part_return


def _join(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
    hold("join", task=request.id)
    return _original_join(self, request, *args, **kwargs)


PollingRedisBackend.on_chord_part_return = _join

_original_stitch = Canny.stitch


def _stitch(self: Any, *args: Any, **kwargs: Any) -> Any:
    hold("stitch")
    return _original_stitch(self, *args, **kwargs)


Canny.stitch = _stitch


@after_task_publish.connect
def _published(headers: dict[str, Any] | None = None, **_: Any) -> None:
    # The client, after its second strip message: the rest of the chord is still to come.
    if (headers or {}).get("task") == "luminagrid.strip" and (headers or {}).get("group_index") == 1:
        hold("publish", task=headers.get("id"))


@before_task_publish.connect
def _publishing(headers: dict[str, Any] | None = None, body: Any = None, **_: Any) -> None:
    # The client, about to send its last strip message: every payload is in Redis already.
    headers = headers or {}
    try:
        strips = body[0][0]["strips"]
    except (TypeError, LookupError):
        return
    if headers.get("task") == "luminagrid.strip" and headers.get("group_index") == strips - 1:
        hold("last-publish", task=headers.get("id"))


_original_collect = jobs.Job._collect


def _collect(self: Any, *args: Any, **kwargs: Any) -> Any:
    hold("collect", job=self.id)
    return _original_collect(self, *args, **kwargs)


jobs.Job._collect = _collect
