"""The client API: submit an image as a chord of strip tasks and wait for the stitched result.

    job = luminagrid.submit("photo.png", op="bilateral", params={"d": 9})
    result = job.wait(timeout_s=60)
    result.image  # (H, W, 3) uint8 for a colour photo; Canny (the default op) gives (H, W) 0/255

While it waits, a job watches over its own tasks (the watchdog): a strip whose message is neither
queued, held unacknowledged by a worker, nor finished, on two looks a second apart, was lost
(typically by a Redis restart while a worker was taking it off the queue) and is published again
under the same task id. Redis's chord join counts each strip once, so copies are harmless.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import kombu.exceptions
import numpy as np
import redis
from celery import chord
from celery.canvas import Signature

from luminagrid import broker, claims, codec, images, messages, ops, strips
from luminagrid.app import app
from luminagrid.codec import Codec
from luminagrid.errors import BrokerUnreachable, InputError, JobFailed, JobNotFound, JobTimeout, MessageError
from luminagrid.settings import KEY_PREFIX, QUEUE, Settings
from luminagrid.stages import Stages
from luminagrid.tasks import run_strip, stitch

#: How often `Job.wait` looks at Redis, in seconds (Celery's default of 0.5 s adds ~0.5 s a job).
POLL_S = 0.01
#: The watchdog looks this often, and not before a job is this old, in seconds.
WATCH_INTERVAL_S = 1.0
#: Looks in a row that must find a task nowhere before it is published again.
WATCH_MISSES = 2
#: After this long unfinished, check that some worker is online, in seconds (then every 10 s).
WORKER_CHECK_S = 2.0
REDIS_ERRORS = (redis.RedisError, kombu.exceptions.OperationalError, OSError)

# Finds task ids in the queue and in the Redis transport's unacked hash. Values are kombu's JSON
# envelopes whose last part, the properties, holds `"correlation_id": "<task id>"`; only the
# tail of each value is searched, so the pixel payloads are not scanned.
_FIND_TASKS_LUA = """
-- Returns, per id, 0 (nowhere), 1 (queued) or 2 (held unacknowledged by a worker).
local found = {}
local function scan(values, where)
  for _, v in ipairs(values) do
    local tail = string.sub(v, -4096)
    for i, id in ipairs(ARGV) do
      if not found[i] and string.find(tail, '"' .. id .. '"', 1, true) then found[i] = where end
    end
  end
end
scan(redis.call('LRANGE', KEYS[1], 0, -1), 1)
scan(redis.call('HVALS', KEYS[2]), 2)
local out = {}
for i = 1, #ARGV do out[i] = found[i] or 0 end
return out
"""

Notice = Callable[[str], None]


@dataclass(frozen=True)
class Params:
    """What to compute and how to ship it. `validate()` raises `InputError` naming the bad value."""

    op: str = ops.DEFAULT
    #: the operation's parameters by name (text or numbers); `validate()` fills in the defaults
    values: Mapping[str, Any] = field(default_factory=dict)
    strips: int | None = None
    codec: Codec = Codec.jpeg
    quality: int = 95

    @property
    def operation(self) -> ops.Operation:
        return ops.get(self.op)

    def validate(self) -> Params:
        """A copy with every parameter of the operation present and checked."""
        values = self.operation.values(self.values)
        if self.strips is not None and not (1 <= self.strips <= strips.MAX_STRIPS):
            raise InputError(f"--strips {self.strips} is out of range; use 1 to {strips.MAX_STRIPS}.")
        if not (1 <= self.quality <= 100):
            raise InputError(f"--quality {self.quality} is out of range; use 1 to 100.")
        return replace(self, values=values, codec=Codec(self.codec))


@dataclass
class JobResult:
    """A finished job: `image` is (H, W) or (H, W, 3) uint8 (Canny: (H, W), 0 and 255)."""

    job_id: str
    image: np.ndarray
    #: worker name -> strips it computed
    workers: dict[str, int]
    stitched_by: str
    wall_s: float
    #: tasks the watchdog published again
    republished: int = 0
    stages: Stages = field(default_factory=Stages)

    @property
    def edges(self) -> np.ndarray:
        """The output under Canny's name (kept for callers written before other operations)."""
        return self.image


@dataclass
class Status:
    """A job's progress, as `cli.py status` shows it."""

    job_id: str
    state: str  # "queued", "running", "done", "failed"
    strips_done: int
    strips_started: int
    strip_count: int
    width: int
    height: int
    age_s: float
    output: str | None
    error: str | None = None


def _key(job_id: str) -> str:
    return f"{KEY_PREFIX}job:{job_id}"


def _metas(task_ids: list[str]) -> list[dict[str, Any] | None]:
    """Result metadata of tasks (one MGET; None where nothing is stored yet)."""
    backend = app.backend
    raws = backend.client.mget([backend.get_key_for_task(t) for t in task_ids])
    return [None if raw is None else backend.decode_result(raw) for raw in raws]


def _error_text(meta: dict[str, Any]) -> str:
    """The message of a failed task's stored exception, without Celery's wrapping."""
    exc = meta.get("result")
    if isinstance(exc, BaseException):  # Celery rebuilds the stored exception when decoding
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, dict) and "exc_message" in exc:
        message = exc["exc_message"]
        text = " ".join(str(m) for m in message) if isinstance(message, (list, tuple)) else str(message)
        return f"{exc.get('exc_type', 'Error')}: {text}"
    return str(exc)


@dataclass
class Job:
    """A submitted job. `wait()` returns its result; `status()` tells where it stands."""

    spec: messages.JobSpec
    output: str | None = None
    submitted_at: float = field(default_factory=time.time)
    #: The strip signatures as published; only the submitting process has them (they hold pixels).
    signatures: list[Signature] | None = None
    body: Signature | None = None
    _done: dict[int, dict[str, Any]] = field(default_factory=dict)
    _misses: Counter[str] = field(default_factory=Counter)
    republished: int = 0
    #: The strips' group, whose chord join a republished strip must report to (set by submit).
    group_id: str | None = None
    _warned_no_workers: bool = False
    _broker_client: redis.Redis | None = None
    #: where this job's time went; the submitter fills in read..publish, `wait` the rest
    stages: Stages = field(default_factory=Stages)

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def width(self) -> int:
        return self.spec.width

    @property
    def height(self) -> int:
        return self.spec.height

    @property
    def strip_count(self) -> int:
        return self.spec.strips

    def strip_task_id(self, index: int) -> str:
        return f"{self.id}.strip{index}"

    @property
    def stitch_label(self) -> str:
        """What Flower and logs show for the stitch task instead of the strips' results."""
        return f"job {self.id[:8]} {self.spec.op} stitch {self.strip_count} strips"

    def strip_label(self, s: strips.Strip) -> str:
        """What Flower and logs show for a strip task instead of kilobytes of pixels."""
        return f"job {self.id[:8]} {self.spec.op} strip {s.index + 1}/{self.strip_count} rows {s.row0}-{s.row1}"

    # --- the record that lets another process find this job -------------------------------------

    def save_record(self, ttl_s: int) -> None:
        record = {**self.spec.to_message(), "output": self.output, "submitted_at": self.submitted_at}
        app.backend.client.set(_key(self.id), json.dumps(record), ex=ttl_s)

    @classmethod
    def find(cls, job_id: str) -> Job:
        """The job with this id, from its record in Redis, or raise `JobNotFound`."""
        raw = app.backend.client.get(_key(job_id))
        if raw is None:
            raise JobNotFound(
                f"no job {job_id!r} in Redis at {broker.redacted(app.conf.broker_url)}: it was never "
                "submitted there, was already collected, or expired; check the id and LUMINAGRID_BROKER_URL."
            )
        record = json.loads(raw)  # the job message, plus where to write and when it was sent
        spec = messages.parse_job(record, Settings.from_env().max_pixels)
        return cls(spec=spec, output=record.get("output"), submitted_at=record["submitted_at"])

    # --- progress ---------------------------------------------------------------------------------

    def _unfinished(self) -> list[int]:
        """Indices of the strips not yet seen finished."""
        return [i for i in range(self.strip_count) if i not in self._done]

    def _poll(self) -> tuple[dict[str, Any] | None, dict[int, dict[str, Any] | None]]:
        """The stitch task's meta, and strip index -> meta for the strips not seen finished before."""
        todo = self._unfinished()
        metas = _metas([self.id, *(self.strip_task_id(i) for i in todo)])
        strip_metas = dict(zip(todo, metas[1:]))
        for i, meta in strip_metas.items():
            if meta is not None and meta["status"] == "SUCCESS":
                self._done[i] = meta["result"]
        return metas[0], strip_metas

    def status(self) -> Status:
        body, strip_metas = self._poll()
        polled = [m for m in strip_metas.values() if m is not None]
        started = len(self._done) + sum(1 for m in polled if m["status"] == "STARTED")
        failed = [m for m in polled if m["status"] == "FAILURE"]
        error = None
        if body is not None and body["status"] == "SUCCESS":
            state = "done"
        elif failed or (body is not None and body["status"] == "FAILURE"):
            state, error = "failed", self._failure_text(body, strip_metas)
        else:
            state = "running" if started else "queued"
        return Status(
            job_id=self.id, state=state, strips_done=len(self._done), strips_started=started,
            strip_count=self.strip_count, width=self.width, height=self.height,
            age_s=time.time() - self.submitted_at, output=self.output, error=error,
        )

    def _failure_text(self, body: dict[str, Any] | None, strip_metas: dict[int, dict[str, Any] | None]) -> str:
        """Why the job failed: the first failed strip's own error (from `_poll`), else the stitch's."""
        plan = strips.plan_strips(self.height, self.strip_count, self.spec.halo_rows)
        for i, meta in sorted(strip_metas.items()):
            if meta is not None and meta["status"] == "FAILURE":
                where = f"strip {i + 1}/{self.strip_count} (rows {plan[i].row0}-{plan[i].row1})"
                text = _error_text(meta)
                if text.startswith("WorkerLostError"):
                    return (
                        f"{where} killed its worker process on every delivery ({text}); it is not "
                        "delivered again (LUMINAGRID_MAX_DELIVERIES). Check the workers' logs and memory."
                    )
                return f"{where} failed: {text}"
        return f"stitching failed: {_error_text(body)}" if body else "unknown failure"

    # --- waiting ----------------------------------------------------------------------------------

    def wait(
        self,
        timeout_s: float = 600.0,
        on_progress: Callable[[int, int], None] | None = None,
        on_notice: Notice | None = None,
        forget: bool = True,
    ) -> JobResult:
        """Block until the stitched result is in; raise `JobFailed`, `JobTimeout` or `BrokerUnreachable`.

        With `forget`, the job's data is deleted from Redis once collected; otherwise call `forget()`
        after using the result (as the CLI does, after writing the file).
        """
        waiter = self.waiter(timeout_s, on_progress, on_notice)
        while (result := waiter.step()) is None:
            time.sleep(waiter.pause_s)
        if forget:
            self.forget()
        return result

    def waiter(
        self,
        timeout_s: float = 600.0,
        on_progress: Callable[[int, int], None] | None = None,
        on_notice: Notice | None = None,
    ) -> Waiter:
        """A non-blocking `wait`: call `step()` until it returns the result (how batches wait on many)."""
        return Waiter(self, timeout_s, on_progress, on_notice or (lambda _text: None))

    def _give_up(self, timeout_s: float, down_since: float | None, error: BaseException | None) -> None:
        later = f"collect it later with: python cli.py result {self.id}"
        if down_since is not None:
            raise BrokerUnreachable(
                f"Redis at {broker.redacted(app.conf.broker_url)} has not answered for "
                f"{time.monotonic() - down_since:.0f} s ({error}); job {self.id} did not finish within "
                f"{timeout_s:g} s. Once Redis is back, {later}"
            )
        raise JobTimeout(
            f"job {self.id} did not finish within {timeout_s:g} s ({self._whereabouts()}); {later} "
            "(or raise --timeout)."
        )

    def _whereabouts(self) -> str:
        """Where the unfinished strips are, e.g. "3/7 strips done, 2 queued, 2 held by workers"."""
        text = f"{len(self._done)}/{self.strip_count} strips done"
        todo = [self.strip_task_id(i) for i in self._unfinished()]
        if not todo:
            return text + ", stitch pending"
        try:
            found = self._find(todo)
        except REDIS_ERRORS:
            return text
        where = Counter({0: "nowhere (lost)", 1: "queued", 2: "held by workers"}[f] for f in found)
        return ", ".join([text, *(f"{n} {what}" for what, n in where.items())])

    def _find(self, task_ids: list[str]) -> list[int]:
        """Per task id: 0 nowhere, 1 queued, 2 held unacknowledged by a worker (`_FIND_TASKS_LUA`)."""
        # The queue and kombu's unacked hash live in the broker's Redis, which need not be the
        # result backend's (LUMINAGRID_RESULT_BACKEND).
        if self._broker_client is None:
            self._broker_client = broker.client(app.conf.broker_url)
        return [int(f) for f in self._broker_client.eval(_FIND_TASKS_LUA, 2, QUEUE, "unacked", *task_ids)]

    def _warn_if_no_workers(self, notice: Notice, timeout_s: float) -> bool:
        """Say so if no worker answers a ping; True while none does."""
        replies = app.control.ping(timeout=1.0, limit=1) or []
        if replies:
            if self._warned_no_workers:
                notice("a worker is online now")
            return False
        self._warned_no_workers = True
        notice(
            f"no workers are consuming queue '{QUEUE}' at {broker.redacted(app.conf.broker_url)} "
            f"(workers online: 0); start one with `celery -A luminagrid worker`. Job {self.id} stays "
            f"queued; waiting up to {timeout_s:g} s."
        )
        return True

    def _watch(self, notice: Notice) -> None:
        """Publish again any task of this job that is nowhere: not queued, unacked, nor finished."""
        ids = [self.strip_task_id(i) for i in self._unfinished()] or [self.id]
        found = self._find(ids)
        # Between our poll and the scan a task may have finished and been acked: look again.
        finished = {i for i, meta in zip(ids, _metas(ids)) if meta is not None and meta["status"] in ("SUCCESS", "FAILURE")}
        for task_id, seen in zip(ids, found):
            if seen or task_id in finished:
                self._misses.pop(task_id, None)
                continue
            self._misses[task_id] += 1
            if self._misses[task_id] >= WATCH_MISSES:
                del self._misses[task_id]
                if self._republish(task_id):
                    notice(f"task {task_id} was lost (was Redis restarted?); published it again")
                else:
                    notice(f"task {task_id} seems lost and only its submitter holds its pixels; "
                           "if the job does not finish, submit the image again")

    def _republish(self, task_id: str) -> bool:
        if task_id == self.id:  # the stitch: every strip is done, so its input is at hand
            parts = [self._done[i] for i in range(self.strip_count)]
            stitch.signature((parts, self.spec.to_message()), task_id=self.id, argsrepr=self.stitch_label).apply_async()
        elif self.signatures is not None and self.body is not None and self.group_id is not None:
            index = int(task_id.rsplit("strip", 1)[1])
            sig = self.signatures[index]
            sig.clone(group_id=self.group_id, group_index=index, chord=self.body).apply_async()
        else:
            return False  # another process submitted it and holds the pixels
        self.republished += 1
        return True

    def _collect(self, meta: dict[str, Any], wall_s: float) -> JobResult:
        spec = self.spec
        def key_of(field: str, index: int | None) -> str:  # a list holds one value per strip
            return claims.key_for(spec.id, "out", spec.strips if index is None else index, field)

        try:
            meta = claims.redeem_fields(meta, key_of, messages.result_limit(spec.height, spec), f"job {self.id} output")
            image = spec.operation.collect(meta, spec.height, spec.width, spec.channels)
        except (MessageError, codec.CodecError) as exc:
            raise JobFailed(f"job {self.id} finished but its output cannot be read: {exc}") from None
        seconds = meta.get("seconds") or {}
        stitch_s = float(seconds.get("stitch", 0.0))
        self.stages.add("compute", max(0.0, wall_s - stitch_s))
        self.stages.add("stitch", stitch_s)
        self.stages.worker_seconds = {k: float(v) for k, v in (seconds.get("strips") or {}).items()}
        self.stages.slowest_strip_s = float(seconds.get("slowest_strip", 0.0))
        return JobResult(
            job_id=self.id, image=image, workers=dict(meta["workers"]), stitched_by=str(meta["stitched_by"]),
            wall_s=wall_s, republished=self.republished, stages=self.stages,
        )

    def forget_quietly(self) -> None:
        """`forget`, for clean-up after a failure: a Redis error here changes nothing."""
        try:
            self.forget()
        except REDIS_ERRORS:
            pass

    def forget(self) -> None:
        """Delete this job's results and record from Redis (else they expire after a day)."""
        backend = app.backend
        ids = [self.id, *(self.strip_task_id(i) for i in range(self.strip_count))]
        backend.client.delete(_key(self.id), *(backend.get_key_for_task(t) for t in ids),
                              *claims.keys_of(self.id, self.strip_count, self.spec.operation.fields))


class Waiter:
    """One job's wait, a step at a time: progress, the watchdog, Redis outages and the deadline."""

    def __init__(
        self, job: Job, timeout_s: float, on_progress: Callable[[int, int], None] | None, notice: Notice
    ) -> None:
        self.job, self.timeout_s, self.on_progress, self.notice = job, timeout_s, on_progress, notice
        self.start = time.monotonic()
        self.deadline = self.start + timeout_s
        self.next_watch = self.start + WATCH_INTERVAL_S
        self.next_worker_check = self.start + WORKER_CHECK_S
        self.shown = -1
        self.down_since: float | None = None
        self.last_error: BaseException | None = None

    @property
    def pause_s(self) -> float:
        """How long to sleep before the next step."""
        return POLL_S if self.down_since is None else 0.2

    def step(self) -> JobResult | None:
        """Look once: the result when the job is done, else None; raise when it failed or timed out."""
        job = self.job
        try:
            body, strip_metas = job._poll()
            if body is not None and body["status"] == "SUCCESS":
                if self.on_progress is not None:
                    self.on_progress(job.strip_count, job.strip_count)
                with job.stages.timed("collect"):
                    return job._collect(body["result"], time.monotonic() - self.start)
            if body is not None and body["status"] == "FAILURE":
                raise JobFailed(f"job {job.id} failed: {job._failure_text(body, strip_metas)}")
            if self.on_progress is not None and len(job._done) != self.shown:
                self.shown = len(job._done)
                self.on_progress(self.shown, job.strip_count)
            now = time.monotonic()
            if now >= self.next_worker_check:
                none_online = job._warn_if_no_workers(self.notice, self.timeout_s)
                self.next_worker_check = now + 10.0 if none_online else math.inf
            if now >= self.next_watch:
                job._watch(self.notice)
                self.next_watch = now + WATCH_INTERVAL_S
            if self.down_since is not None:
                self.notice(f"Redis at {broker.redacted(app.conf.broker_url)} answers again")
                self.down_since = None
        except REDIS_ERRORS as exc:
            self.last_error = exc
            if self.down_since is None:
                self.down_since = time.monotonic()
                self.notice(f"lost Redis at {broker.redacted(app.conf.broker_url)} ({exc}); retrying")
        if time.monotonic() > self.deadline:
            job._give_up(self.timeout_s, self.down_since, self.last_error)
        return None


def load(
    image: np.ndarray | str | Path, op: ops.Operation, settings: Settings, stages: Stages | None = None
) -> np.ndarray:
    """The 8-bit array `op` computes on (`Operation.prepare`), from a path or an array."""
    stages = stages or Stages()
    if isinstance(image, (str, Path)):
        with stages.timed("read"):
            image = images.read_image(Path(image), settings.max_pixels)
    else:
        images.check_pixels(image, settings.max_pixels, "the image")
    with stages.timed("convert"):
        return op.prepare(image)


def submit(
    image: np.ndarray | str | Path,
    *,
    op: str = ops.DEFAULT,
    params: Mapping[str, Any] | None = None,
    low: float | None = None,
    high: float | None = None,
    strips: int | None = None,
    codec: Codec | str = Codec.jpeg,
    quality: int = 95,
    settings: Settings | None = None,
) -> Job:
    """Cut `image` (a path, or an (H, W[, C]) uint8/uint16 array) into strips and send the chord.

    `op` names the operation (`ops.REGISTRY`) and `params` its parameters; `low`/`high` are
    shorthands for Canny's. Canny runs on the gray conversion (`images.to_gray8`), the other
    operations on 8-bit gray or BGR (`images.to_bgr8`).
    """
    given = dict(params or {})
    given.update({k: v for k, v in (("low", low), ("high", high)) if v is not None})
    checked = Params(op=op, values=given, strips=strips, codec=Codec(codec), quality=int(quality)).validate()
    settings = settings or Settings.from_env()
    stages = Stages()
    return submit_pixels(load(image, checked.operation, settings, stages), checked, settings=settings, stages=stages)


def submit_pixels(
    pixels: np.ndarray, params: Params, output: str | None = None, settings: Settings | None = None,
    stages: Stages | None = None,
) -> Job:
    """Send the chord for an (H, W) or (H, W, 3) uint8 image (`load`), with validated `params`.

    `output` is recorded with the job, for `cli.py result` to write to later; `stages` holds the
    timing of what came before (reading, conversion).
    """
    settings = settings or Settings.from_env()
    op = params.operation
    height, width = pixels.shape[:2]
    count = params.strips or strips.default_strip_count(height, width, op.strip_pixels)
    plan = strips.plan_strips(height, count, strips.halo_for(op.halo_rows(params.values)))
    spec = messages.JobSpec(
        id=str(uuid.uuid4()), op=op.name, params=dict(params.values), width=width, height=height,
        channels=codec.channels_of(pixels), strips=len(plan), codec=params.codec, quality=params.quality,
    )
    job = Job(spec=spec, output=output, stages=stages or Stages())
    message = spec.to_message()
    with job.stages.timed("encode"):
        # Both codecs release the GIL: encode strips on every core.
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            payloads = list(pool.map(lambda s: codec.encode_strip(pixels[s.top:s.bottom], params.codec, params.quality), plan))
    try:
        job.save_record(settings.result_ttl_s)
        with job.stages.timed("publish"):  # large payloads wait in Redis as claims (`claims`)
            payloads = claims.offload_many(
                ((p, claims.key_for(job.id, "in", s.index)) for p, s in zip(payloads, plan)), settings
            )
        job.signatures = [
            run_strip.signature(
                (message, messages.strip_message(s), payload),
                task_id=job.strip_task_id(s.index), argsrepr=job.strip_label(s),
            )
            for s, payload in zip(plan, payloads)
        ]
        job.body = stitch.signature((message,), task_id=job.id, argsrepr=job.stitch_label)
        with job.stages.timed("publish"):
            final = chord(job.signatures, job.body).apply_async()
        job.group_id = final.parent.id  # the chord join's key: a republished strip must name it
    except REDIS_ERRORS as exc:
        raise BrokerUnreachable(
            f"could not submit to Redis at {broker.redacted(app.conf.broker_url)} ({exc}); check that it is "
            "up and that LUMINAGRID_BROKER_URL is right."
        ) from None
    return job
