"""Celery tasks: thin wrappers that validate, decode, call the operation's pure core, and encode.

Message layout: see `messages.py`. Delivery is at least once (acks late, requeue on a lost pool
process), so both tasks are idempotent: running a strip twice gives the same bytes, and the Redis
chord join counts each strip once.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any

import redis
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from luminagrid import claims, codec, messages
from luminagrid.app import app
from luminagrid.errors import MessageError
from luminagrid.settings import Settings

SETTINGS = Settings.from_env()
#: Worth retrying with backoff: Redis blips and a strip interrupted by the soft time limit.
TRANSIENT = (redis.ConnectionError, redis.TimeoutError, SoftTimeLimitExceeded)


def _worker_name(task: Task) -> str:
    return f"{task.request.hostname or 'local'}[{os.getpid()}]"


_RETRY = {
    "autoretry_for": TRANSIENT,
    "retry_backoff": 1,
    "retry_backoff_max": SETTINGS.retry_backoff_max_s,
    "retry_jitter": True,
    # A pool process that dies mid-task (killed, out of memory, a crash in native code) turns into
    # a retry 1 s later, counted like any retry: an input that kills its worker every time fails
    # its job after `max_deliveries` runs instead of looping, and the worker stays up.
    "retry_on_worker_lost": True,
    "default_retry_delay": 1,
    "max_retries": SETTINGS.max_deliveries - 1,
}


@app.task(name="luminagrid.strip", bind=True, **_RETRY)
def run_strip(self: Task, job: Any, strip: Any, payload: Any) -> dict[str, Any]:
    """Validate and decode one strip, run its operation's strip step, return the packed result."""
    spec = messages.parse_job(job, SETTINGS.max_pixels)
    s = messages.parse_strip(strip, spec)
    data = messages.check_payload(payload, s, spec)
    op = spec.operation
    t0 = time.perf_counter()
    try:
        pixels = codec.decode_strip(data, spec.codec, s.bottom - s.top, spec.width, spec.channels)
    except codec.CodecError as exc:
        raise MessageError(f"job {spec.id} strip {s.index}: {exc}") from None
    t1 = time.perf_counter()
    result = op.compute(pixels, s, spec.height, spec.params)
    t2 = time.perf_counter()
    # Large outputs (local operations' pixels) wait in Redis; the chord carries only their keys.
    packed = claims.offload_fields(op.pack(result), lambda field: claims.key_for(spec.id, "out", s.index, field), SETTINGS)
    return {
        **packed,
        "index": s.index,
        "row0": s.row0,
        "row1": s.row1,
        "worker": _worker_name(self),
        "seconds": {"decode": t1 - t0, "compute": t2 - t1, "pack": time.perf_counter() - t2},
    }


def _redeemed(part: dict[str, Any], spec: messages.JobSpec) -> dict[str, Any]:
    """A strip result with its claims replaced by their bytes."""
    index = part["index"]
    return claims.redeem_fields(
        part, lambda field, _: claims.key_for(spec.id, "out", index, field),
        messages.result_limit(part["row1"] - part["row0"], spec), f"job {spec.id} strip {index} result",
    )


def _check_claims(parts: list[dict[str, Any]], spec: messages.JobSpec) -> None:
    """Every claimed strip output is still in Redis, and no larger than its strip can be."""
    for p in parts:
        limit = messages.result_limit(p["row1"] - p["row0"], spec)
        for field, value in p.items():
            if claims.is_claim(value):
                key = claims.key_for(spec.id, "out", p["index"], field)
                claims.check(value, key, limit, f"job {spec.id} strip {p['index']} result")


@app.task(name="luminagrid.stitch", bind=True, **_RETRY)
def stitch(self: Task, parts: list[dict[str, Any]], job: Any) -> dict[str, Any]:
    """Chord callback: check that the strips tile the image, then the operation's stitch step."""
    started = time.perf_counter()
    spec = messages.parse_job(job, SETTINGS.max_pixels)
    height, width = spec.height, spec.width
    parts = sorted(parts, key=lambda p: p["index"])
    if [p["index"] for p in parts] != list(range(spec.strips)):
        raise MessageError(f"job {spec.id}: got strips {[p['index'] for p in parts]}, expected {spec.strips}")
    if [p["row0"] for p in parts] != [0, *(p["row1"] for p in parts[:-1])] or parts[-1]["row1"] != height:
        raise MessageError(f"job {spec.id}: strips do not tile rows 0-{height}")
    if spec.operation.global_pass:  # it needs the strips' bytes; a local operation only their order
        parts = [_redeemed(p, spec) for p in parts]
    else:
        _check_claims(parts, spec)
    try:
        stitched = spec.operation.stitch(parts, width, spec.channels)
    except codec.CodecError as exc:
        raise MessageError(f"job {spec.id}: a strip result is corrupt: {exc}") from None
    stitched = claims.offload_fields(stitched, lambda field: claims.key_for(spec.id, "out", spec.strips, field), SETTINGS)
    strip_seconds = [p.get("seconds") or {} for p in parts]
    return {
        **stitched,
        "width": width,
        "height": height,
        "workers": dict(Counter(p["worker"] for p in parts)),
        "stitched_by": _worker_name(self),
        "seconds": {
            "stitch": time.perf_counter() - started,
            "strips": {k: sum(float(t.get(k, 0.0)) for t in strip_seconds) for k in ("decode", "compute", "pack")},
            "slowest_strip": max((sum(map(float, t.values())) for t in strip_seconds), default=0.0),
        },
    }
