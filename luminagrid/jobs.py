"""The client API: submit an image as a chord of strip tasks, wait for the result, cancel.

    job = luminagrid.submit("photo.png", op="bilateral", params={"d": 9})
    result = job.wait(timeout_s=60)
    result.image  # (H, W, 3) uint8 for a colour photo; Canny (the default op) gives (H, W) 0/255

Recovery does not live here: the cluster's supervisor (`supervisor.py`) republishes lost strips
and stitches from the job's record in Redis (`record.py`), whether anyone waits or not. The one
thing only a waiting submitter can do is write the job again if Redis crashed before it could
persist it: for `DURABLE_S` after publishing it keeps the payloads, and if Redis's run id
changes meanwhile it writes the record and payloads again and asks the supervisor to look.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import kombu.exceptions
import numpy as np
import redis
from celery import chord, states

from luminagrid import broker, claims, codec, images, liveness, messages, ops, status, strips
from luminagrid import record as records
from luminagrid.app import app
from luminagrid.codec import Codec
from luminagrid.errors import (
    BrokerUnreachable,
    ClaimGone,
    InputError,
    JobCancelled,
    JobFailed,
    JobTimeout,
    MessageError,
)
from luminagrid.record import Record
from luminagrid.settings import JOB_EVENTS_KEY, PROGRESS_KEY, QUEUE, WALK_KEY, Settings
from luminagrid.stages import Stages
from luminagrid.tasks import stitch_signature, strip_signature

#: How often `Job.wait` looks for the result, in seconds: fast at first (small jobs finish in
#: tens of milliseconds), then slower, so that many waiting clients cost Redis little.
POLL_FAST_S, POLL_SLOW_S, FAST_FOR_S = 0.01, 0.05, 2.0
#: Progress (strips done) and cancellation are looked at this often, in seconds.
PROGRESS_EVERY_S = 0.25
#: After this long unfinished, check that some worker is alive (then every 10 s), in seconds.
WORKER_CHECK_S = 2.0
#: How long the submitter keeps a job's payloads after publishing, to write them again if Redis
#: crashed before persisting them (AOF `appendfsync everysec` fsyncs every second), in seconds.
DURABLE_S = 3.0
REDIS_ERRORS = (redis.RedisError, kombu.exceptions.OperationalError, OSError)

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
    #: recoveries the supervisor made for this job (lost strips or stitch published again, ...)
    republished: int = 0
    stages: Stages = field(default_factory=Stages)

    @property
    def edges(self) -> np.ndarray:
        """The output under Canny's name (kept for callers written before other operations)."""
        return self.image


def _run_id(db: redis.Redis) -> str:
    return str(db.info("server")["run_id"])


@dataclass
class Job:
    """A submitted job. `wait()` returns its result; `status()` tells where it stands."""

    record: Record
    #: where this job's time went; the submitter fills in read..publish, `wait` the rest
    stages: Stages = field(default_factory=Stages)
    #: (key, bytes) of every payload, kept by the submitter until the job is durable in Redis
    payloads: list[tuple[str, bytes]] | None = None
    #: Redis's run id when the job was written, and when that write became durable
    run_id: str | None = None
    durable_at: float = 0.0
    ttl_s: int = Settings.result_ttl_s

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def spec(self) -> messages.JobSpec:
        return self.record.spec

    @property
    def output(self) -> str | None:
        return self.record.output

    @property
    def width(self) -> int:
        return self.spec.width

    @property
    def height(self) -> int:
        return self.spec.height

    @property
    def strip_count(self) -> int:
        return self.spec.strips

    @property
    def group_id(self) -> str:
        return self.record.group_id

    def strip_task_id(self, index: int) -> str:
        return self.record.strip_task_id(index)

    @classmethod
    def find(cls, job_id: str) -> Job:
        """The job with this id, from its record in Redis, or raise `JobNotFound`."""
        settings = Settings.from_env()
        return cls(record=records.load(job_id, settings.max_pixels), ttl_s=settings.result_ttl_s)

    # --- where it stands --------------------------------------------------------------------------

    def status(self) -> status.Status:
        return status.of(self.record)

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

    def _collect(self, meta: dict[str, Any], wall_s: float) -> JobResult:
        spec = self.spec

        def key_of(field: str, index: int | None) -> str:  # a list holds one value per strip
            return claims.key_for(spec.id, "out", spec.strips if index is None else index, field)

        meta = claims.redeem_fields(meta, key_of, messages.result_limit(spec.height, spec), f"job {self.id} output")
        try:
            image = spec.operation.collect(meta, spec.height, spec.width, spec.channels)
        except codec.CodecError as exc:
            raise JobFailed(f"job {self.id} finished but its output cannot be read: {exc}") from None
        seconds = meta.get("seconds") or {}
        stitch_s = float(seconds.get("stitch", 0.0))
        self.stages.add("compute", max(0.0, wall_s - stitch_s))
        self.stages.add("stitch", stitch_s)
        self.stages.worker_seconds = {k: float(v) for k, v in (seconds.get("strips") or {}).items()}
        self.stages.slowest_strip_s = float(seconds.get("slowest_strip", 0.0))
        return JobResult(
            job_id=self.id, image=image, workers=dict(meta["workers"]), stitched_by=str(meta["stitched_by"]),
            wall_s=wall_s, republished=int(records.fast_client().llen(JOB_EVENTS_KEY.format(job=self.id))),
            stages=self.stages,
        )

    # --- durability: what only the submitter can do -----------------------------------------------

    def _watch_redis(self, db: redis.Redis, notice: Notice) -> None:
        """Write the job again if Redis restarted before the job was durable (see module docstring)."""
        run_id = _run_id(db)
        if self.run_id is None:
            self.run_id = run_id
        if run_id == self.run_id:
            if self.payloads is not None and time.monotonic() >= self.durable_at:
                self.payloads = None  # on disk by now: the supervisor can republish from Redis
            return
        self.run_id = run_id
        if self.payloads is None or records.is_cancelled(self.id):
            return
        notice(f"Redis restarted within {DURABLE_S:g} s of receiving job {self.id}; writing the job again")
        with records.client().pipeline(transaction=False) as pipe:
            for key, data in self.payloads:
                pipe.set(key, data, ex=self.ttl_s)
            pipe.set(WALK_KEY, f"job {self.id}'s submitter saw Redis restart", ex=self.ttl_s)
            pipe.execute()
        if self.record.state == records.RUNNING:  # (else `submit_pixels` marks it running next)
            records.mark_running(self.record, self.ttl_s)
        self.durable_at = time.monotonic() + DURABLE_S

    # --- cancel and clean up ----------------------------------------------------------------------

    def cancel(self, fast: bool = False) -> None:
        """Stop the job: workers skip its strips from now on, and its data is deleted from Redis.

        `fast`: fail at once if Redis is away (on Ctrl-C), instead of retrying for a minute."""
        records.cancel(self.record, self.ttl_s, records.fast_client() if fast else None)
        self.payloads = None

    def forget_quietly(self) -> None:
        """`forget`, for clean-up after a failure: a Redis error here changes nothing."""
        try:
            self.forget()
        except REDIS_ERRORS:
            pass

    def forget(self) -> None:
        """Delete this job's results and record from Redis (else they expire after a day)."""
        records.forget(self.record)


class Waiter:
    """One job's wait, a step at a time: the result, progress, Redis outages and the deadline."""

    def __init__(
        self, job: Job, timeout_s: float, on_progress: Callable[[int, int], None] | None, notice: Notice
    ) -> None:
        self.job, self.timeout_s, self.on_progress, self.notice = job, timeout_s, on_progress, notice
        self.start = time.monotonic()
        self.deadline = self.start + timeout_s
        self.next_progress = self.start
        self.next_worker_check = self.start + WORKER_CHECK_S
        self.next_redis_check = self.start
        self.shown = -1
        self.down_since: float | None = None
        self.last_error: BaseException | None = None
        self.warned_no_workers = False

    @property
    def pause_s(self) -> float:
        """How long to sleep before the next step."""
        if self.down_since is not None:
            return 0.2
        return POLL_FAST_S if time.monotonic() - self.start < FAST_FOR_S else POLL_SLOW_S

    def step(self) -> JobResult | None:
        """Look once: the result when the job is done, else None; raise when it failed or timed out."""
        job = self.job
        db = records.fast_client()
        try:
            now = time.monotonic()
            if job.payloads is not None and now >= self.next_redis_check:  # until the job is durable
                job._watch_redis(db, self.notice)
                self.next_redis_check = now + 0.25
            meta = records.metas([job.id], db)[0]
            if meta is not None and meta["status"] == states.SUCCESS:
                if self.on_progress is not None:
                    self.on_progress(job.strip_count, job.strip_count)
                result = self._collect(meta["result"])
                if result is not None:
                    return result
            elif meta is not None and meta["status"] == states.FAILURE:
                raise JobFailed(f"job {job.id} failed: {status.failure_text(job.record, meta, records.progress(job.id, db))}")
            if now >= self.next_progress:
                self.next_progress = now + PROGRESS_EVERY_S
                self._look_at_progress(db)
            if now >= self.next_worker_check:
                self.next_worker_check = now + (10.0 if self._no_workers(db) else math.inf)
            if self.down_since is not None:
                self.notice(f"Redis at {broker.redacted(app.conf.broker_url)} answers again")
                self.down_since = None
        except REDIS_ERRORS as exc:
            self.last_error = exc
            if self.down_since is None:
                self.down_since = time.monotonic()
                self.notice(f"lost Redis at {broker.redacted(app.conf.broker_url)} ({exc}); retrying")
        if time.monotonic() > self.deadline:
            self._give_up()
        return None

    def _collect(self, meta: dict[str, Any]) -> JobResult | None:
        """The result, or None if its bytes vanished in a Redis restart (then the supervisor redoes
        what was lost and a later step collects)."""
        try:
            with self.job.stages.timed("collect"):
                return self.job._collect(meta, time.monotonic() - self.start)
        except ClaimGone as exc:
            self.job._watch_redis(records.fast_client(), self.notice)  # writes the job again if a crash lost it
            if not records.exists(self.job.id):
                raise JobFailed(f"job {self.job.id} finished but its output cannot be read: {exc}") from None
            # Lost in a crash of Redis (the job itself is still there): have it stitched again.
            self.notice(f"the output of job {self.job.id} is gone from Redis ({exc.key}); the cluster stitches it again")
            records.reopen(self.job.record)
            return None
        except MessageError as exc:
            raise JobFailed(f"job {self.job.id} finished but its output cannot be read: {exc}") from None

    def _look_at_progress(self, db: redis.Redis) -> None:
        job = self.job
        if records.is_cancelled(job.id, db):
            raise JobCancelled(f"job {job.id} was cancelled (python cli.py cancel, or Ctrl-C of the submitter that waited for it).")
        if self.on_progress is not None:
            done = int(db.hlen(PROGRESS_KEY.format(job=job.id)))
            if done != self.shown:
                self.shown = done
                self.on_progress(done, job.strip_count)

    def _no_workers(self, db: redis.Redis) -> bool:
        """Say so if no worker is alive; True while none is."""
        alive = [n for n in liveness.read(db) if n.alive]
        if alive:
            if self.warned_no_workers:
                self.notice("a worker is online now")
            self.warned_no_workers = False
            return False
        if not self.warned_no_workers:
            self.notice(
                f"no workers are consuming queue '{QUEUE}' at {broker.redacted(app.conf.broker_url)} "
                f"(workers online: 0); start one with `celery -A luminagrid worker`. Job {self.job.id} stays "
                f"queued; waiting up to {self.timeout_s:g} s."
            )
        self.warned_no_workers = True
        return True

    def _give_up(self) -> None:
        job = self.job
        later = f"collect it later with: python cli.py result {job.id}"
        if self.down_since is not None:
            raise BrokerUnreachable(
                f"Redis at {broker.redacted(app.conf.broker_url)} has not answered for "
                f"{time.monotonic() - self.down_since:.0f} s ({self.last_error}); job {job.id} did not finish within "
                f"{self.timeout_s:g} s. Once Redis is back, {later}"
            )
        try:
            where = job.status().whereabouts()
        except REDIS_ERRORS:
            where = "Redis unreachable"
        raise JobTimeout(f"job {job.id} did not finish within {self.timeout_s:g} s ({where}); {later} (or raise --timeout).")


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

    Before the first message, the job's record and every strip's payload are written to Redis
    (`record.py`), so the cluster can recover the job without this process. `output` is
    recorded with the job, for `cli.py result` to write to later; `stages` holds the timing of
    what came before (reading, conversion).
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
    rec = Record(spec=spec, output=output, submitted_at=time.time())
    job = Job(record=rec, stages=stages or Stages(), ttl_s=settings.result_ttl_s)
    with job.stages.timed("encode"):
        # Both codecs release the GIL: encode strips on every core.
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            payloads = list(pool.map(lambda s: codec.encode_strip(pixels[s.top:s.bottom], params.codec, params.quality), plan))
    keys = [claims.key_for(spec.id, "in", s.index) for s in plan]
    try:
        db = records.client()
        with job.stages.timed("publish"):
            job.run_id = _run_id(db)
            with db.pipeline(transaction=False) as pipe:  # the record and every payload, then messages
                rec.save(settings.result_ttl_s, pipe)
                for key, data in zip(keys, payloads):
                    pipe.set(key, data, ex=settings.result_ttl_s)
                pipe.execute()
            # Small payloads ride inside their messages too (no round trip for the worker).
            header = [
                strip_signature(rec, s, data if len(data) <= settings.inline_max_bytes else {"claim": key})
                for s, data, key in zip(plan, payloads, keys)
            ]
            chord(header, stitch_signature(rec), task_id=rec.group_id).apply_async()
            job.payloads = list(zip(keys, payloads))
            job.durable_at = time.monotonic() + DURABLE_S
            job._watch_redis(db, lambda _text: None)  # did Redis restart while we published?
            job.record = rec.with_state(records.RUNNING)
            records.mark_running(rec, settings.result_ttl_s)  # not if it was cancelled meanwhile
    except REDIS_ERRORS as exc:
        _cancel_quietly(job)  # what went out must not run on, unwanted
        raise BrokerUnreachable(
            f"could not submit to Redis at {broker.redacted(app.conf.broker_url)} ({exc}); check that it is "
            "up and that LUMINAGRID_BROKER_URL is right."
        ) from None
    except KeyboardInterrupt:  # interrupted while publishing: what was sent must not run
        _cancel_quietly(job)
        raise
    return job


def _cancel_quietly(job: Job) -> None:
    try:
        job.cancel(fast=True)
    except REDIS_ERRORS:
        pass  # Redis is away: the supervisor finishes the job once it is back (`PUBLISH_STALE_S`)
