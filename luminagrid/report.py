"""What `cli.py ... --json` prints: one JSON object per image, job or worker, one per line.

    report.emit(report.image(source="a.png", status="done", ...))

Plain dicts of plain values, built from what the human output shows (README, "Scripting").
Light on purpose: no Celery, no OpenCV (the objects it reads are passed in).
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from luminagrid.batch import Item
    from luminagrid.monitor import WorkerInfo
    from luminagrid.status import Status

#: `status` of an image object: written, failed (see "error"), published only (`--detach`), or
#: cancelled by this process's Ctrl-C / SIGTERM.
DONE, FAILED, DETACHED, CANCELLED = "done", "failed", "detached", "cancelled"


def emit(obj: dict[str, Any]) -> None:
    """One line of JSON on stdout, flushed (a reader of a pipe sees each image as it finishes)."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def image(
    *, source: str | None, status: str, op: str, job_id: str | None = None, output: str | None = None,
    width: int | None = None, height: int | None = None, strips: int | None = None, codec: str | None = None,
    quality: int | None = None, workers: dict[str, int] | None = None, recoveries: int = 0,
    seconds: float | None = None, error: str | None = None,
) -> dict[str, Any]:
    """An image of `submit` (or the job of `result`): every key always present (null if unknown),
    but "error", present only when `status` is "failed" or "cancelled"."""
    obj: dict[str, Any] = {
        "job_id": job_id, "source": source, "output": output, "status": status, "op": op,
        "width": width, "height": height, "strips": strips, "codec": codec,
        "quality": quality if codec == "jpeg" else None,
        "workers": dict(sorted((workers or {}).items())), "recoveries": recoveries,
        "seconds": None if seconds is None else round(seconds, 3),
    }
    if error is not None:
        obj["error"] = error
    return obj


def item(i: Item, op: str, codec: str, quality: int) -> dict[str, Any]:
    """An image of a batch (or of `--detach`) as it ended."""
    status = {"ok": DONE, "submitted": DETACHED, "cancelled": CANCELLED}.get(i.state, FAILED)
    error = i.error or (f"cancelled job {i.job_id}" if status == CANCELLED and i.job_id else status)
    return image(
        source=i.source, status=status, op=op, job_id=i.job_id, output=str(i.out) if i.out else None,
        width=i.width or None, height=i.height or None, strips=i.strips or None, codec=codec, quality=quality,
        workers=i.workers, recoveries=i.recoveries, seconds=i.seconds if status != DETACHED else None,
        error=None if status in (DONE, DETACHED) else error,
    )


def status(s: Status) -> dict[str, Any]:
    """`status JOB`: its state, progress and where each unfinished task is."""
    return {
        "job_id": s.job_id, "state": s.state, "strips_done": s.strips_done, "strips_total": s.strip_count,
        "strips_running": s.strips_started - s.strips_done, "width": s.width, "height": s.height,
        "age_s": round(s.age_s, 3), "output": s.output,
        "unfinished": [] if s.state in ("done", "cancelled") else [
            {"index": p.index, "where": p.where, "worker": p.worker,
             "alive": p.alive if p.where == "held" else None, "running": p.running}
            for p in s.places
        ],
        "recovered": list(s.events), "error": s.error,
        "copies": [{k: c.get(k) for k in ("strip", "node", "origin", "reason", "outcome")} for c in s.copies],
    }


def worker(w: WorkerInfo) -> dict[str, Any]:
    """A worker of `workers`."""
    return {
        "name": w.name, "host": w.host, "online": w.online, "alive": w.alive,
        "beat_age_s": None if w.beat_age_s is None else round(w.beat_age_s, 3), "liveness": w.liveness,
        "pool_processes": w.pool_processes or None, "active_strips": w.active_strips,
        "processed": w.processed if w.online else None,
    }
