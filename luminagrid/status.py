"""Where a job stands, from what Redis says: its record, its progress, the workers' holdings.

    s = status.of(record)   # what `cli.py status` prints
    s.state                 # "queued", "running", "done", "failed" or "cancelled"
    s.places                # where each unfinished strip (and a pending stitch) is
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from celery import states

from luminagrid import liveness
from luminagrid import record as records
from luminagrid.errors import MessageError
from luminagrid.record import Record
from luminagrid.settings import JOB_EVENTS_KEY


@dataclass(frozen=True)
class Place:
    """Where an unfinished task is: `where` is "queued" or "held"; a holder is alive or lost."""

    index: int | None  # strip index, None for the stitch
    where: str
    worker: str | None = None
    alive: bool = True
    running: bool = False


@dataclass
class Status:
    """A job's progress, as `cli.py status` shows it."""

    job_id: str
    state: str  # "queued", "running", "done", "failed", "cancelled"
    strips_done: int
    strips_started: int
    strip_count: int
    width: int
    height: int
    age_s: float
    output: str | None
    error: str | None = None
    #: where each unfinished strip (and a pending stitch) is
    places: list[Place] = field(default_factory=list)
    #: the supervisor's recoveries for this job, oldest first
    events: list[str] = field(default_factory=list)
    #: speculative copies of its strips (`speculation.copies`): strip, node, origin, reason, outcome
    copies: list[dict[str, Any]] = field(default_factory=list)

    def whereabouts(self) -> str:
        """E.g. "3/7 strips done, 2 held by live workers, 2 queued"."""
        counts = Counter(
            "queued" if p.where == "queued" else "held by live workers" if p.alive else "held by lost workers"
            for p in self.places if p.index is not None
        )
        text = f"{self.strips_done}/{self.strip_count} strips done"
        if self.strips_done == self.strip_count and self.state not in ("done", "failed"):
            return text + ", stitch pending"
        return ", ".join([text, *(f"{n} {what}" for what, n in counts.items())])


def error_text(meta: dict[str, Any]) -> str:
    """The message of a failed task's stored exception, without Celery's wrapping."""
    exc = meta.get("result")
    if isinstance(exc, BaseException):  # Celery rebuilds the stored exception when decoding
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, dict) and "exc_message" in exc:
        message = exc["exc_message"]
        text = " ".join(str(m) for m in message) if isinstance(message, (list, tuple)) else str(message)
        return f"{exc.get('exc_type', 'Error')}: {text}"
    return str(exc)


def of(record: Record) -> Status:
    """The job's status now (a few round trips to Redis, none that grows with the queue)."""
    db = records.fast_client()
    job_id, strip_count = record.id, record.spec.strips
    stitch_meta = records.metas([job_id], db)[0]
    progress = records.progress(job_id, db)
    held: dict[str, tuple[liveness.Node, liveness.Hold]] = {}
    for node in liveness.read(db):
        for hold in node.holds:
            if hold.task_id not in held or node.alive:
                held[hold.task_id] = (node, hold)
    places = []
    for i in [i for i in range(strip_count) if i not in progress] + [None]:
        task_id = job_id if i is None else record.strip_task_id(i)
        if task_id in held:
            node, hold = held[task_id]
            places.append(Place(i, "held", node.id, node.alive, hold.state == "running"))
        elif i is not None:
            places.append(Place(i, "queued"))
    failed = any(s == states.FAILURE for s in progress.values())
    stitch_state = stitch_meta["status"] if stitch_meta else None
    error = None
    verdict = stitch_state == states.FAILURE and isinstance(stitch_meta.get("result"), MessageError)  # type: ignore[union-attr]
    if not verdict and (record.state == records.CANCELLED or records.is_cancelled(job_id, db)):
        state = "cancelled"  # (the supervisor's verdict on a job it ended outranks its cancel mark)
    elif stitch_state == states.SUCCESS:
        state = "done"
    elif failed or stitch_state == states.FAILURE:
        state, error = "failed", failure_text(record, stitch_meta, progress)
    else:
        state = "running" if progress or any(p.running for p in places) else "queued"
    events = [records.event_text(raw) for raw in db.lrange(JOB_EVENTS_KEY.format(job=job_id), 0, -1)]
    return Status(
        job_id=job_id, state=state, strips_done=len(progress),
        strips_started=len(progress) + sum(1 for p in places if p.running and p.index is not None),
        strip_count=strip_count, width=record.spec.width, height=record.spec.height,
        age_s=time.time() - record.submitted_at, output=record.output, error=error, places=places, events=events,
        copies=records.copies(job_id, db),
    )


def input_error(record: Record, progress: dict[int, str]) -> str | None:
    """The message of a failed strip's `InputError` (a `file` job's file its worker could not
    decode), or None."""
    failed = sorted(i for i, s in progress.items() if s == states.FAILURE)
    for meta in records.metas([record.strip_task_id(i) for i in failed]):
        text = error_text(meta) if meta is not None and meta["status"] == states.FAILURE else ""
        if text.startswith("InputError: "):
            return text.removeprefix("InputError: ")
    return None


def failure_text(record: Record, stitch_meta: dict[str, Any] | None, progress: dict[int, str]) -> str:
    """Why the job failed: the first failed strip's own error, else the stitch's."""
    failed = sorted(i for i, s in progress.items() if s == states.FAILURE)
    plan = record.plan()
    for i, meta in zip(failed, records.metas([record.strip_task_id(i) for i in failed])):
        if meta is None or meta["status"] != states.FAILURE:
            continue
        where = f"strip {i + 1}/{record.spec.strips} (rows {plan[i].row0}-{plan[i].row1})"
        text = error_text(meta)
        if text.startswith("WorkerLostError"):
            died = records.kills(record.id, i)
            on = f", on every worker it ran on ({', '.join(sorted(died))})" if died else ""
            return (
                f"{where} killed its worker process on every delivery{on} ({text}); it is not "
                "delivered again (LUMINAGRID_MAX_DELIVERIES). Check the workers' logs and memory."
            )
        return f"{where} failed: {text}"
    if stitch_meta is None:
        return "unknown failure"
    if isinstance(stitch_meta.get("result"), MessageError):  # the supervisor's own verdict
        return str(stitch_meta["result"])
    return f"stitching failed: {error_text(stitch_meta)}"
