"""Celery tasks: thin wrappers that validate, decode, call the operation's pure core, and encode.

Message layout: see `messages.py`. Delivery is at least once (acks late, requeue on a lost pool
process, the supervisor publishing lost ones again), so both tasks are idempotent: running a strip
twice gives the same bytes, and the Redis chord join counts each strip once.

A cancelled job's tasks end without a result (`Ignore`): a strip checks before it decodes and
again before it stores its output; the supervisor deletes the job's data once more when no live
worker holds its tasks.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import redis
from celery import Task
from celery.canvas import Signature
from billiard.exceptions import WorkerLostError
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from celery.utils.nodenames import worker_direct

from luminagrid import claims, codec, costs, liveness, messages, queues, source, strips
from luminagrid import record as records
from luminagrid.app import app
from luminagrid.backend import strip_of
from luminagrid.codec import Codec
from luminagrid.errors import ClaimGone, MessageError
from luminagrid.record import Record
from luminagrid.settings import CANCEL_KEY, PROGRESS_KEY, Settings

SETTINGS = Settings.from_env()
log = logging.getLogger(__name__)
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


def _ignore(task: Task) -> None:
    """End without a result: also drop the STARTED state this task stored."""
    app.backend.client.delete(app.backend.get_key_for_task(task.request.id))
    raise Ignore()


def _skip_if_unwanted(task: Task, job_id: str, index: int | None = None,
                      cost: tuple[str, float, float] | None = None) -> None:
    """End without a result if the job was cancelled, or (given strip `index`) if another run
    of this strip finished first (a speculative copy, or the original it copied). In the same
    round trip, `cost` (class, CPU seconds, megapixels) goes to its class's history (`costs`)."""
    with app.backend.client.pipeline(transaction=False) as pipe:
        pipe.exists(CANCEL_KEY.format(job=job_id))
        if index is not None:
            pipe.hexists(PROGRESS_KEY.format(job=job_id), str(index))
        if cost is not None:
            costs.record(pipe, *cost)
        cancelled, *done = pipe.execute()[: 2 if index is not None else 1]
    if cancelled:
        _ignore(task)
    if done and done[0]:
        raise Ignore()  # (its stored result is the other run's: keep it)


def _lost(task: Task, exc: ClaimGone, job_id: str, forget_strip: int | None = None) -> None:
    """A claim is gone: lost in a crash of Redis (or the job expired, or the message is forged).
    End without a result (`Ignore`) and let the supervisor redo what is missing from the job's
    record: publish the strip again once its payload is back (its submitter writes it again), or
    fail the job if it never comes back. With no record, nobody can wait for the job: the
    message is dropped, with a warning."""
    if forget_strip is not None:
        records.forget_strip(job_id, forget_strip)
    records.request_walk(f"job {job_id}: {exc.key} is gone")
    if not records.exists(job_id):
        log.warning("%s; job %s is not in Redis (expired, collected, or lost in a crash): dropped the message", exc, job_id)
    _ignore(task)


def _labels(spec: messages.JobSpec) -> Record:
    """Where the task labels are made (`Record.strip_label`, `.stitch_label`), for a validated job:
    the label a message carries (`argsrepr`) is whatever its publisher wrote."""
    return Record(spec=spec, output=None, submitted_at=0.0)


def _bytes_in(value: Any) -> int:
    """Bytes held by the byte strings in a result (in its dicts and lists too), in bytes."""
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, dict):
        return sum(_bytes_in(v) for v in value.values())
    if isinstance(value, list):
        return sum(_bytes_in(v) for v in value)
    return 0


def _size_text(size: int) -> str:
    """812 B, 41 KB, 3.2 MB (KB = 1024 bytes)."""
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{round(size / 1024)} KB"
    return f"{size / (1024 * 1024):.1f} MB"


def summary(label: str, seconds: float, out_bytes: int, result: dict[str, Any]) -> str:
    """What a task did, in one line for its worker's log and Flower's result column (the result
    itself is bytes; `workarounds._results_shown_by_their_summary`):
    "job 5f3a87b2 canny strip 3/9 rows 480-720: 0.04 s, 41 KB out, claim".

    `seconds`: the task's own work (a strip: decode + compute + pack); `out_bytes`: the bytes of
    its output before any went to claims (the stitch's includes strips' bytes it hands on inline);
    "claim" if `result` carries any claim check (those bytes wait in Redis), else "inline"."""
    def has_claim(value: Any) -> bool:
        return claims.is_claim(value) or (isinstance(value, list) and any(map(has_claim, value)))

    travel = "claim" if any(has_claim(v) for v in result.values()) else "inline"
    return f"{label}: {seconds:.2f} s, {_size_text(out_bytes)} out, {travel}"


def _spec(task: Task, job: Any) -> messages.JobSpec:
    """The job's spec, checked, with this worker's operation for it: the submitter's package and
    version, or `OperationUnavailable` naming this worker, the package and the versions."""
    return messages.parse_job(job, SETTINGS.max_pixels, where=f"worker {_worker_name(task)}")


class StripTask(Task):
    """The strip task's class: remembers, per worker, the pool processes that died running a strip."""

    def on_retry(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        # (In the worker's main process, as Celery retries a strip whose pool process was lost.)
        strip = strip_of(task_id)
        if isinstance(exc, WorkerLostError) and strip is not None:
            try:
                records.killed(strip[0], strip[1], str(self.request.hostname or "?"), SETTINGS.result_ttl_s)
            except redis.RedisError:
                log.warning("could not record that a pool process died running %s", task_id)


def _elsewhere_if_it_killed_here(task: Task, spec: messages.JobSpec, s: strips.Strip) -> None:
    """A strip whose pool process died on this worker before goes to a worker where it never did,
    if there is one alive that runs its operation: only a strip that kills its process on every
    worker it visits fails its job (a sick worker does not make an innocent strip look like
    poison). Same message, same retry count; this delivery ends without a result."""
    here = str(task.request.hostname or "")
    died = records.kills(spec.id, s.index)
    if not died.get(here):
        return
    others = [n for n in liveness.read(app.backend.client) if n.alive and n.hostname not in died
              and n.hostname != here and n.runs(spec.op, spec.package, spec.version)]
    if not others:
        return
    target = min(others, key=lambda n: len(n.running))
    task.signature_from_request(task.request, queue=worker_direct(target.hostname)).apply_async()
    log.warning("%s killed its pool process on %s before; sent it to %s, where it never did",
                _labels(spec).strip_label(s), here, target.id)
    raise Ignore()


@app.task(name="luminagrid.strip", bind=True, base=StripTask, **_RETRY)
def run_strip(self: Task, job: Any, strip: Any, payload: Any) -> dict[str, Any]:
    """Validate and decode one strip, run its operation's strip step, return the packed result."""
    spec = _spec(self, job)
    s = messages.parse_strip(strip, spec)
    _skip_if_unwanted(self, spec.id, s.index)
    if self.request.retries:  # (only a strip delivered again can have killed a process here)
        _elsewhere_if_it_killed_here(self, spec, s)
    try:
        data = messages.check_payload(payload, s, spec)
    except ClaimGone as exc:
        _lost(self, exc, spec.id)
    return _compute(self, spec, s, data)


def _compute(task: Task, spec: messages.JobSpec, s: strips.Strip, data: bytes, in_stitch: bool = False) -> dict[str, Any]:
    """Decode strip `s`, run its operation's strip step, pack the result (large fields as claims;
    not if the job was cancelled meanwhile, nor, in a strip task, if another run of the strip
    finished first; `in_stitch`: the stitch computes a strip again whose output a crash lost)."""
    op = spec.operation
    t0, cpu0 = time.perf_counter(), time.process_time()
    try:
        pixels = _decode_file(spec, data) if spec.file else codec.decode_strip(
            data, spec.codec, s.bottom - s.top, spec.width, spec.channels)
    except codec.CodecError as exc:
        raise MessageError(f"job {spec.id} strip {s.index}: {exc}") from None
    t1 = time.perf_counter()
    result = op.compute(pixels, s, spec.height, spec.params)
    t2 = time.perf_counter()
    # What this strip cost, for the supervisor's judgement of running strips (`costs`, `speculation`).
    cost = (costs.class_of(spec), time.process_time() - cpu0, costs.megapixels(s.bottom - s.top, spec.width))
    _skip_if_unwanted(task, spec.id, None if in_stitch else s.index, cost)
    # Large outputs (local operations' pixels) wait in Redis; the chord carries only their keys.
    # What the seam pass reads stays inline up to the usual size; the rest within a job-wide budget.
    job_limit = claims.inline_limit(SETTINGS, spec.strips)
    fields = op.pack(result)
    packed = claims.offload_fields(
        fields, lambda field: claims.key_for(spec.id, "out", s.index, field), SETTINGS,
        lambda field: SETTINGS.inline_max_bytes if field in op.stitch_fields else job_limit,
    )
    t3 = time.perf_counter()
    return {
        **packed, "index": s.index, "row0": s.row0, "row1": s.row1, "worker": _worker_name(task),
        "seconds": {"decode": t1 - t0, "compute": t2 - t1, "pack": t3 - t2},
        "summary": summary(_labels(spec).strip_label(s), t3 - t0, _bytes_in(fields), packed),
    }


def _decode_file(spec: messages.JobSpec, data: bytes) -> Any:
    """A `file` job's pixels, as the submitter would have sent them: the file decoded as it
    streams (`source.decode_file`), converted for the operation, and in JPEG mode round-tripped
    through JPEG (one strip's JPEG decodes to the rows of the whole image's: `codec`).

    A file that does not decode raises `InputError` (the job fails; its submitter names the file)."""
    pixels = spec.operation.prepare(source.decode_file(data, spec.width, spec.height))
    if spec.codec is Codec.jpeg:
        pixels = codec.jpeg_roundtrip(pixels, spec.quality)
    if pixels.shape != codec.shape_of(spec.height, spec.width, spec.channels):
        raise codec.CodecError(f"the file decoded to {pixels.shape}, not {spec.width}x{spec.height}x{spec.channels}")
    return pixels


def _ready(task: Task, part: dict[str, Any], spec: messages.JobSpec) -> dict[str, Any]:
    """A strip result as the stitch needs it: the fields its operation's stitch reads
    (`Operation.stitch_fields`) with their claims' bytes; every other claim checked to be there
    (the client reads them). A result whose bytes a crash of Redis lost is computed again here,
    from the strip's payload."""
    index = part["index"]
    limit = messages.result_limit(part["row1"] - part["row0"], spec)
    what = f"job {spec.id} strip {index} result"
    needed = spec.operation.stitch_fields
    try:
        for field, value in part.items():
            if claims.is_claim(value) and field not in needed:
                claims.check(value, claims.key_for(spec.id, "out", index, field), limit, what)
        fetched = claims.redeem_fields({k: v for k, v in part.items() if k in needed},
                                       lambda field, _: claims.key_for(spec.id, "out", index, field), limit, what)
        return {**part, **fetched}
    except ClaimGone:
        log.warning("%s: its output is gone from Redis (lost in a crash?); computing strip %d again", what, index)
        s = strips.plan_strips(spec.height, spec.strips, spec.halo_rows)[index]
        try:
            data = claims.redeem({"claim": claims.key_for(spec.id, "in", index)}, claims.key_for(spec.id, "in", index),
                                 messages.payload_limit(s, spec), f"job {spec.id} strip {index}")
        except ClaimGone as exc:  # its input is gone too: the strip must wait for its submitter
            _lost(task, exc, spec.id, forget_strip=index)
        return _ready(task, _compute(task, spec, s, data, in_stitch=True), spec)


@app.task(name="luminagrid.stitch", bind=True, **_RETRY)
def stitch(self: Task, parts: list[dict[str, Any]], job: Any) -> dict[str, Any]:
    """Chord callback: check that the strips tile the image, then the operation's stitch step."""
    started = time.perf_counter()
    spec = _spec(self, job)
    _skip_if_unwanted(self, spec.id)
    height, width = spec.height, spec.width
    parts = sorted(parts, key=lambda p: p["index"])
    if [p["index"] for p in parts] != list(range(spec.strips)):
        raise MessageError(f"job {spec.id}: got strips {[p['index'] for p in parts]}, expected {spec.strips}")
    if [p["row0"] for p in parts] != [0, *(p["row1"] for p in parts[:-1])] or parts[-1]["row1"] != height:
        raise MessageError(f"job {spec.id}: strips do not tile rows 0-{height}")
    parts = [_ready(self, p, spec) for p in parts]
    try:
        stitched = spec.operation.stitch(parts, width, spec.channels)
    except codec.CodecError as exc:
        raise MessageError(f"job {spec.id}: a strip result is corrupt: {exc}") from None
    out_bytes = _bytes_in(stitched)
    stitched = claims.offload_fields(stitched, lambda field: claims.key_for(spec.id, "out", spec.strips, field), SETTINGS)
    strip_seconds = [p.get("seconds") or {} for p in parts]
    seconds = time.perf_counter() - started
    return {
        **stitched,
        "width": width,
        "height": height,
        "workers": dict(Counter(p["worker"] for p in parts)),
        "stitched_by": _worker_name(self),
        "summary": summary(_labels(spec).stitch_label, seconds, out_bytes, stitched),
        "seconds": {
            "stitch": seconds,
            "strips": {k: sum(float(t.get(k, 0.0)) for t in strip_seconds) for k in ("decode", "compute", "pack")},
            "slowest_strip": max((sum(map(float, t.values())) for t in strip_seconds), default=0.0),
        },
    }


# --- the messages of a job ------------------------------------------------------------------------


def stitch_signature(rec: Record) -> Signature:
    """The chord's body: the stitch task, under the job's id."""
    return stitch.signature((rec.spec.to_message(),), task_id=rec.id, argsrepr=rec.stitch_label)


def strip_signature(rec: Record, s: strips.Strip, payload: bytes | dict[str, str], in_chord: bool = False) -> Signature:
    """Strip `s`'s task with its payload (inline bytes or a claim), at its job's priority.
    `in_chord`: with the chord fields a copy published again needs, to report to the same join
    (`chord()` sets them itself)."""
    sig = run_strip.signature(
        (rec.spec.to_message(), messages.strip_message(s), payload),
        task_id=rec.strip_task_id(s.index), argsrepr=rec.strip_label(s),
        priority=queues.priority_for(rec.spec.width * rec.spec.height),
    )
    if in_chord:
        sig = sig.clone(group_id=rec.group_id, group_index=s.index, chord=stitch_signature(rec))
    return sig


def _apply(sig: Signature) -> None:
    sig.apply_async()


def republish_strip(rec: Record, index: int, publish: Callable[[Signature], Any] = _apply) -> None:
    """Publish strip `index` again under its own task id, its payload read from its claim key.

    Its result joins the same chord; a copy that was not lost after all is harmless (the join
    counts each strip once). `publish` sends the signature (the supervisor's is fenced:
    `lease.Fence.publish`)."""
    s = rec.plan()[index]
    publish(strip_signature(rec, s, {"claim": claims.key_for(rec.id, "in", index)}, in_chord=True))


def republish_stitch(rec: Record, parts: list[dict[str, Any]],
                     publish: Callable[[Signature], Any] = _apply) -> None:
    """Publish the stitch again, outside the chord, with the strips' stored results (`publish`: as above)."""
    publish(stitch.signature((parts, rec.spec.to_message()), task_id=rec.id, argsrepr=rec.stitch_label))
