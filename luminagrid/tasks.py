"""Celery tasks: thin wrappers that validate, decode, call the pure core, and encode.

Message layout: see `messages.py`. Delivery is at least once (acks late, requeue on a lost pool
process), so both tasks are idempotent: running a strip twice gives the same bytes, and the Redis
chord join counts each strip once.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Any

import numpy as np
import redis
from billiard.exceptions import WorkerLostError
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.worker.request import Request

from luminagrid import canny, codec, messages, strips
from luminagrid.app import app
from luminagrid.errors import MessageError, StripPoisoned
from luminagrid.settings import KEY_PREFIX, Settings

logger = logging.getLogger(__name__)
SETTINGS = Settings.from_env()
HALO_ROWS = strips.halo_for(canny.HALO_NEEDED_ROWS)
#: Worth retrying with backoff: Redis blips and a strip interrupted by the soft time limit.
TRANSIENT = (redis.ConnectionError, redis.TimeoutError, SoftTimeLimitExceeded)


def losses_key(task_id: str) -> str:
    """Redis hash {count, reason}: how often running this task killed its worker process."""
    return f"{KEY_PREFIX}lost:{task_id}"


class StripRequest(Request):
    """Runs in the worker's main process, which survives its pool processes: when one dies while
    running a strip, count it, so that an input that always kills its worker is not retried forever."""

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> None:
        if isinstance(exc_info.exception, WorkerLostError):
            try:
                client = self.task.backend.client
                key = losses_key(self.id)
                client.pipeline().hincrby(key, "count", 1).hset(key, "reason", str(exc_info.exception)).expire(
                    key, SETTINGS.result_ttl_s
                ).execute()
            except redis.RedisError:
                logger.exception("could not record the loss of %s", self.id)
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)


def _refuse_poison(task: Task, job: messages.JobSpec, s: strips.Strip) -> None:
    """Fail this strip if earlier deliveries killed the worker `max_deliveries` times."""
    lost = task.backend.client.hgetall(losses_key(task.request.id))
    count = int(lost.get(b"count", 0))
    if count >= SETTINGS.max_deliveries:
        reason = lost.get(b"reason", b"unknown").decode(errors="replace")
        raise StripPoisoned(
            f"strip {s.index + 1}/{job.strips} (rows {s.row0}-{s.row1}) of job {job.id} killed its worker "
            f"process on each of {count} deliveries (last: {reason}); it is not delivered again. "
            "Check the workers' logs and memory; a different --strips count may avoid the crash."
        )


def _worker_name(task: Task) -> str:
    return f"{task.request.hostname or 'local'}[{os.getpid()}]"


_RETRY = {
    "autoretry_for": TRANSIENT,
    "retry_backoff": 1,
    "retry_backoff_max": SETTINGS.retry_backoff_max_s,
    "retry_jitter": True,
    "max_retries": 3,
}


@app.task(name="luminagrid.canny_strip", bind=True, Request=StripRequest, **_RETRY)
def canny_strip(self: Task, job: Any, strip: Any, payload: Any) -> dict[str, Any]:
    """Validate and decode one strip, run the strip half of exact Canny, return packed bit maps."""
    spec = messages.parse_job(job, SETTINGS.max_pixels)
    s = messages.parse_strip(strip, spec, HALO_ROWS)
    data = messages.check_payload(payload, s, spec)
    _refuse_poison(self, spec, s)
    try:
        gray = codec.decode_strip(data, spec.codec, s.bottom - s.top, spec.width)
    except codec.CodecError as exc:
        raise MessageError(f"job {spec.id} strip {s.index}: {exc}") from None
    result = canny.canny_strip(
        gray, s.halo_top, s.halo_bottom, spec.low, spec.high,
        seam_above=s.row0 > 0, seam_below=s.row1 < spec.height,
    )
    return {
        "index": s.index,
        "row0": s.row0,
        "row1": s.row1,
        "edges": codec.pack_bits(result.edges),
        # Most strips have nothing pending: send None rather than a packed empty map.
        "pending": codec.pack_bits(result.pending) if result.pending.any() else None,
        "worker": _worker_name(self),
    }


@app.task(name="luminagrid.stitch", bind=True, **_RETRY)
def stitch(self: Task, parts: list[dict[str, Any]], job: Any) -> dict[str, Any]:
    """Chord callback: stack the strips, finish hysteresis across seams, return the packed map."""
    spec = messages.parse_job(job, SETTINGS.max_pixels)
    height, width = spec.height, spec.width
    parts = sorted(parts, key=lambda p: p["index"])
    if [p["index"] for p in parts] != list(range(spec.strips)):
        raise MessageError(f"job {spec.id}: got strips {[p['index'] for p in parts]}, expected {spec.strips}")
    edges = np.zeros((height, width), bool)
    pending = np.zeros((height, width), bool)
    for p in parts:
        rows = p["row1"] - p["row0"]
        edges[p["row0"]:p["row1"]] = codec.unpack_bits(p["edges"], rows, width)
        if p["pending"] is not None:
            pending[p["row0"]:p["row1"]] = codec.unpack_bits(p["pending"], rows, width)
    canny.finish_seams(edges, pending, [p["row0"] for p in parts[1:]])
    return {
        "width": width,
        "height": height,
        "edges": codec.pack_bits(edges),
        "workers": dict(Counter(p["worker"] for p in parts)),
        "stitched_by": _worker_name(self),
    }
