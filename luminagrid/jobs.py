"""The client API: submit an image as a chord of strip tasks and wait for the stitched result.

    job = luminagrid.submit("photo.png", low=100, high=200)
    result = job.wait(timeout_s=60)
    result.edges  # (H, W) uint8, 0 or 255

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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kombu.exceptions
import numpy as np
import redis
from celery import chord
from celery.canvas import Signature

from luminagrid import broker, canny, codec, images, messages, strips
from luminagrid.app import app
from luminagrid.codec import Codec
from luminagrid.errors import BrokerUnreachable, InputError, JobFailed, JobNotFound, JobTimeout
from luminagrid.settings import KEY_PREFIX, QUEUE, Settings
from luminagrid.stages import Stages
from luminagrid.tasks import HALO_ROWS, canny_strip, stitch

#: How often `Job.wait` looks at Redis, in seconds (Celery's default of 0.5 s adds ~0.5 s a job).
POLL_S = 0.01
#: The watchdog looks this often, and not before a job is this old, in seconds.
WATCH_INTERVAL_S = 1.0
#: Looks in a row that must find a task nowhere before it is published again.
WATCH_MISSES = 2
#: After this long unfinished, check that some worker is online, in seconds (then every 10 s).
WORKER_CHECK_S = 2.0
REDIS_ERRORS = (redis.RedisError, kombu.exceptions.OperationalError, OSError)
#: Packed byte -> its 8 pixels as 0/255, most significant bit first (np.packbits order).
_BYTE_TO_PIXELS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1) * np.uint8(255)

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

    low: float = 100.0
    high: float = 200.0
    strips: int | None = None
    codec: Codec = Codec.jpeg
    quality: int = 95

    def validate(self) -> None:
        for name, value in (("low", self.low), ("high", self.high)):
            if not (math.isfinite(value) and 0 <= value <= canny.MAX_THRESHOLD):
                raise InputError(
                    f"--{name} {value:g} is out of range; use a value from 0 to {canny.MAX_THRESHOLD:g}."
                )
        if self.low > self.high:
            raise InputError(f"--low {self.low:g} is above --high {self.high:g}; make low <= high.")
        if self.strips is not None and not (1 <= self.strips <= strips.MAX_STRIPS):
            raise InputError(f"--strips {self.strips} is out of range; use 1 to {strips.MAX_STRIPS}.")
        if not (1 <= self.quality <= 100):
            raise InputError(f"--quality {self.quality} is out of range; use 1 to 100.")


@dataclass
class JobResult:
    """A finished job: `edges` is (H, W) uint8 with 0 and 255."""

    job_id: str
    edges: np.ndarray
    #: worker name -> strips it computed
    workers: dict[str, int]
    stitched_by: str
    wall_s: float
    #: tasks the watchdog published again
    republished: int = 0
    stages: Stages = field(default_factory=Stages)


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
        """What Flower and logs show for the stitch task instead of the strips' bit maps."""
        return f"job {self.id[:8]} stitch {self.strip_count} strips"

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
        plan = strips.plan_strips(self.height, self.strip_count, HALO_ROWS)
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
        notice = on_notice or (lambda _text: None)
        start = time.monotonic()
        deadline = start + timeout_s
        next_watch = start + WATCH_INTERVAL_S
        next_worker_check = start + WORKER_CHECK_S
        shown = -1
        down_since: float | None = None
        last_error: BaseException | None = None
        while True:
            try:
                body, strip_metas = self._poll()
                if body is not None and body["status"] == "SUCCESS":
                    if on_progress is not None:
                        on_progress(self.strip_count, self.strip_count)
                    with self.stages.timed("collect"):
                        result = self._collect(body["result"], time.monotonic() - start)
                    if forget:
                        self.forget()
                    return result
                if body is not None and body["status"] == "FAILURE":
                    raise JobFailed(f"job {self.id} failed: {self._failure_text(body, strip_metas)}")
                if on_progress is not None and len(self._done) != shown:
                    shown = len(self._done)
                    on_progress(shown, self.strip_count)
                now = time.monotonic()
                if now >= next_worker_check:
                    next_worker_check = now + 10.0 if self._warn_if_no_workers(notice, timeout_s) else math.inf
                if now >= next_watch:
                    self._watch(notice)
                    next_watch = now + WATCH_INTERVAL_S
                if down_since is not None:
                    notice(f"Redis at {broker.redacted(app.conf.broker_url)} answers again")
                    down_since = None
            except REDIS_ERRORS as exc:
                last_error = exc
                if down_since is None:
                    down_since = time.monotonic()
                    notice(f"lost Redis at {broker.redacted(app.conf.broker_url)} ({exc}); retrying")
            if time.monotonic() > deadline:
                self._give_up(timeout_s, down_since, last_error)
            time.sleep(POLL_S if down_since is None else 0.2)

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
        # One lookup from packed bytes to 0/255 bytes: faster than unpackbits, then * 255.
        packed = codec.unpack_rows(meta["edges"], self.height, self.width)
        edges = _BYTE_TO_PIXELS[packed].reshape(self.height, -1)
        if edges.shape[1] != self.width:  # rows are padded to whole bytes
            edges = np.ascontiguousarray(edges[:, : self.width])
        seconds = meta.get("seconds") or {}
        stitch_s = float(seconds.get("stitch", 0.0))
        self.stages.add("compute", max(0.0, wall_s - stitch_s))
        self.stages.add("stitch", stitch_s)
        self.stages.worker_seconds = {k: float(v) for k, v in (seconds.get("strips") or {}).items()}
        self.stages.slowest_strip_s = float(seconds.get("slowest_strip", 0.0))
        return JobResult(
            job_id=self.id, edges=edges, workers=dict(meta["workers"]), stitched_by=str(meta["stitched_by"]),
            wall_s=wall_s, republished=self.republished, stages=self.stages,
        )

    def forget(self) -> None:
        """Delete this job's results and record from Redis (else they expire after a day)."""
        backend = app.backend
        ids = [self.id, *(self.strip_task_id(i) for i in range(self.strip_count))]
        backend.client.delete(_key(self.id), *(backend.get_key_for_task(t) for t in ids))


def load_gray(image: np.ndarray | str | Path, settings: Settings, stages: Stages | None = None) -> np.ndarray:
    """The (H, W) uint8 gray image a job computes on, from a path or an array."""
    stages = stages or Stages()
    if isinstance(image, (str, Path)):
        with stages.timed("read"):
            image = images.read_image(Path(image), settings.max_pixels)
    else:
        images.check_pixels(image, settings.max_pixels, "the image")
    with stages.timed("gray"):
        return images.to_gray8(image)


def submit(
    image: np.ndarray | str | Path,
    *,
    low: float = 100.0,
    high: float = 200.0,
    strips: int | None = None,
    codec: Codec | str = Codec.jpeg,
    quality: int = 95,
    settings: Settings | None = None,
) -> Job:
    """Cut `image` (a path, or an (H, W[, C]) uint8/uint16 array) into strips and send the chord.

    Canny runs on the image's gray conversion (`images.to_gray8`).
    """
    params = Params(low=float(low), high=float(high), strips=strips, codec=Codec(codec), quality=int(quality))
    params.validate()
    settings = settings or Settings.from_env()
    stages = Stages()
    return submit_gray(load_gray(image, settings, stages), params, settings=settings, stages=stages)


def submit_gray(
    gray: np.ndarray, params: Params, output: str | None = None, settings: Settings | None = None,
    stages: Stages | None = None,
) -> Job:
    """Send the chord for an (H, W) uint8 image whose parameters are already validated.

    `output` is recorded with the job, for `cli.py result` to write to later; `stages` holds the
    timing of what came before (reading, gray conversion).
    """
    settings = settings or Settings.from_env()
    height, width = gray.shape
    count = params.strips or strips.default_strip_count(height, width)
    plan = strips.plan_strips(height, count, HALO_ROWS)
    spec = messages.JobSpec(
        id=str(uuid.uuid4()), width=width, height=height, strips=len(plan), codec=params.codec,
        quality=params.quality, low=params.low, high=params.high,
    )
    job = Job(spec=spec, output=output, stages=stages or Stages())
    message = spec.to_message()
    with job.stages.timed("encode"):
        # Both codecs release the GIL: encode strips on every core.
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            payloads = list(pool.map(lambda s: codec.encode_strip(gray[s.top:s.bottom], params.codec, params.quality), plan))
    try:
        job.save_record(settings.result_ttl_s)
        job.signatures = [
            canny_strip.signature(
                (message, messages.strip_message(s), payload),
                task_id=job.strip_task_id(s.index),
                # What Flower and logs show instead of kilobytes of pixels.
                argsrepr=f"job {job.id[:8]} strip {s.index + 1}/{len(plan)} rows {s.row0}-{s.row1}",
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
