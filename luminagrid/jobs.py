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
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kombu.exceptions
import numpy as np
import redis
from celery import states

from luminagrid import broker, claims, codec, images, liveness, messages, ops, status
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
from luminagrid.params import Params
from luminagrid.record import Record
from luminagrid.settings import JOB_EVENTS_KEY, PROGRESS_KEY, QUEUE, WALK_KEY, Settings
from luminagrid.stages import Stages

#: How often `Job.wait` looks for the result, in seconds: every 2 ms for its first 50 ms (a
#: 640x480 job takes about 10 ms in the workers: a 10 ms poll added 5 ms on average), every 10 ms
#: until 2 s, then every 50 ms, so that many waiting clients cost Redis little.
POLL_FIRST_S, FIRST_FOR_S = 0.002, 0.05
POLL_FAST_S, POLL_SLOW_S, FAST_FOR_S = 0.01, 0.05, 2.0
#: Progress (strips done) and cancellation are looked at this often, in seconds.
PROGRESS_EVERY_S = 0.25
#: After this long unfinished, check that some worker is alive (then every 10 s), in seconds.
WORKER_CHECK_S = 2.0
#: How long the submitter keeps a job's payloads after publishing, to write them again if Redis
#: crashed before persisting them (AOF `appendfsync everysec` fsyncs every second), in seconds;
#: and at most how many bytes of them (the oldest go first: a fast publisher's memory stays bounded).
DURABLE_S = 2.0
DURABLE_MAX_BYTES = 64 * 1024 * 1024
REDIS_ERRORS = (redis.RedisError, kombu.exceptions.OperationalError, OSError)

Notice = Callable[[str], None]


@dataclass
class JobResult:
    """A finished job. `image` is (H, W) or (H, W, 3) uint8 (Canny: (H, W), 0 and 255), fetched
    from Redis when first asked for; `write(path)` writes the output without it where the format
    allows (Canny to PNG: row by row, never the whole image in memory)."""

    job_id: str
    #: worker name -> strips it computed
    workers: dict[str, int]
    stitched_by: str
    wall_s: float
    #: recoveries the supervisor made for this job (lost strips or stitch published again, ...)
    republished: int = 0
    stages: Stages = field(default_factory=Stages)
    spec: messages.JobSpec | None = None
    #: the stitch task's result, claims not yet fetched
    stitched: dict[str, Any] = field(default_factory=dict)
    _image: np.ndarray | None = None

    @property
    def image(self) -> np.ndarray:
        if self._image is None:
            assert self.spec is not None
            spec = self.spec
            with self.stages.timed("collect"):
                try:
                    self._image = spec.operation.collect(self._fetched(), spec.height, spec.width, spec.channels)
                except codec.CodecError as exc:
                    raise JobFailed(f"job {self.job_id} finished but its output cannot be read: {exc}") from None
        return self._image

    @property
    def edges(self) -> np.ndarray:
        """The output under Canny's name (kept for callers written before other operations)."""
        return self.image

    def write(self, out: Path, overwrite: bool = True) -> None:
        """Write the output to `out` atomically (a temp file, then a rename); unless `overwrite`,
        raise `OutputExists` rather than replace a file. Raise `OutputError` first if `out`'s
        format cannot hold the output (colour in `.pgm`, gray levels in `.pbm`)."""
        assert self.spec is not None
        spec, op = self.spec, self.spec.operation
        images.check_format(out, spec.channels, op.bilevel, op.name)
        streamable = self._image is None and out.suffix.lower() == ".png" and hasattr(op, "packed_rows")
        if not streamable:
            image = self.image
            with self.stages.timed("write"):
                images.write_image_atomic(out, image, overwrite)
            return
        with self.stages.timed("write"):  # fetching each strip's edges as its rows are written
            try:
                images.write_bilevel_png_atomic(out, op.packed_rows(self._fetched(lazily=True), spec.width),
                                                spec.width, spec.height, overwrite)
            except (MessageError, codec.CodecError) as exc:  # a claim gone (expired, lost in a crash), a bad field
                raise JobFailed(f"job {self.job_id} finished but its output cannot be read: {exc}; "
                                "submit the image again") from None

    def _fetched(self, lazily: bool = False) -> dict[str, Any]:
        """The stitched result with its claims' bytes (`lazily`: list items as functions that fetch them)."""
        assert self.spec is not None
        spec = self.spec

        def key_of(field: str, index: int | None) -> str:  # a list holds one value per strip
            return claims.key_for(spec.id, "out", spec.strips if index is None else index, field)

        limit, what = messages.result_limit(spec.height, spec), f"job {spec.id} output"
        if not lazily:
            return claims.redeem_fields(self.stitched, key_of, limit, what)

        def later(value: Any, key: str) -> Any:
            return (lambda: claims.redeem(value, key, limit, what)) if claims.is_claim(value) else value

        return {
            k: [later(item, key_of(k, i)) for i, item in enumerate(v)] if isinstance(v, list)
            else claims.redeem(v, key_of(k, None), limit, what) if claims.is_claim(v) else v
            for k, v in self.stitched.items()
        }


def redis_run_id(db: redis.Redis) -> str:
    """Redis's run id: it changes when Redis restarts."""
    return str(db.info("server")["run_id"])


@dataclass
class Job:
    """A submitted job. `wait()` returns its result; `status()` tells where it stands."""

    record: Record
    #: where this job's time went; the submitter fills in read..publish, `wait` the rest
    stages: Stages = field(default_factory=Stages)
    #: (published at, key, bytes) of the payloads of the last `DURABLE_S` seconds: those a crash of
    #: Redis could still lose; written again if Redis's run id changes meanwhile
    kept: deque[tuple[float, str, bytes]] = field(default_factory=deque)
    kept_bytes: int = 0
    #: Redis's run id when the job was written
    run_id: str | None = None
    ttl_s: int = Settings.result_ttl_s
    #: the input file of a `file` job (its worker's complaints about the file name it)
    source: Path | None = None

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
        fetch: bool = True,
    ) -> JobResult:
        """Block until the stitched result is in; raise `JobFailed`, `JobTimeout` or `BrokerUnreachable`.

        With `fetch`, the result's image is fetched before this returns; otherwise when first asked
        for, or never when `JobResult.write` streams it (then keep the job's data: no `forget`).
        With `forget`, the job's data is then deleted from Redis; otherwise call `forget()` when
        done with the result.
        """
        waiter = self.waiter(timeout_s, on_progress, on_notice, eager=fetch or forget)
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
        eager: bool = False,
    ) -> Waiter:
        """A non-blocking `wait`: call `step()` until it returns the result (how batches wait on many).

        With `eager`, the result's image is fetched at once; else when first asked for (or never,
        when `JobResult.write` can stream it): keep the job's data in Redis until then."""
        return Waiter(self, timeout_s, on_progress, on_notice or (lambda _text: None), eager)

    def _collect(self, meta: dict[str, Any], wall_s: float, eager: bool) -> JobResult:
        """The result of the stitch's `meta`; with `eager`, its image fetched now."""
        seconds = meta.get("seconds") or {}
        stitch_s = float(seconds.get("stitch", 0.0))
        self.stages.add("compute", max(0.0, wall_s - stitch_s))
        self.stages.add("stitch", stitch_s)
        self.stages.worker_seconds = {k: float(v) for k, v in (seconds.get("strips") or {}).items()}
        self.stages.slowest_strip_s = float(seconds.get("slowest_strip", 0.0))
        result = JobResult(
            job_id=self.id, workers=dict(meta["workers"]), stitched_by=str(meta["stitched_by"]),
            wall_s=wall_s, republished=int(records.fast_client().llen(JOB_EVENTS_KEY.format(job=self.id))),
            stages=self.stages, spec=self.spec, stitched=meta,
        )
        if eager:
            result.image  # noqa: B018 - fetch it while the job's data is surely in Redis
        return result

    # --- durability: what only the submitter can do -----------------------------------------------

    def keep(self, key: str, data: bytes) -> None:
        """A payload just written: keep it until Redis has surely persisted it (`_watch_redis`)."""
        self.kept.append((time.monotonic(), key, data))
        self.kept_bytes += len(data)
        while self.kept_bytes > DURABLE_MAX_BYTES and len(self.kept) > 1:
            # Memory stays bounded, and nothing is forgotten before Redis has surely persisted it:
            # a faster publisher waits for its oldest payload to be `DURABLE_S` old.
            age = time.monotonic() - self.kept[0][0]
            if age < DURABLE_S:
                time.sleep(DURABLE_S - age)
            self.kept_bytes -= len(self.kept.popleft()[2])

    def _forget_durable(self) -> None:
        """Redis has not restarted since the job was written: what it got `DURABLE_S` ago is on disk."""
        while self.kept and time.monotonic() - self.kept[0][0] >= DURABLE_S:
            self.kept_bytes -= len(self.kept.popleft()[2])

    def _watch_redis(self, db: redis.Redis, notice: Notice) -> None:
        """Write the job again if Redis restarted before the job was durable (see module docstring)."""
        now_id = redis_run_id(db)
        if self.run_id is None:
            self.run_id = now_id
        if now_id == self.run_id:
            self._forget_durable()
            return
        self.run_id = now_id
        if not self.kept or records.is_cancelled(self.id):
            return
        notice(f"Redis restarted within {DURABLE_S:g} s of receiving job {self.id}; writing the job again")
        with records.client().pipeline(transaction=False) as pipe:
            for _, key, data in self.kept:
                pipe.set(key, data, ex=self.ttl_s)
            pipe.set(WALK_KEY, f"job {self.id}'s submitter saw Redis restart", ex=self.ttl_s)
            pipe.execute()
        if self.record.state == records.RUNNING:
            records.mark_running(self.record, self.ttl_s)  # the record too, unless it was cancelled
        else:  # still publishing: "publishing" again, so the supervisor waits for this submitter
            self.record.save(self.ttl_s)
        now = time.monotonic()
        self.kept = deque((now, key, data) for _, key, data in self.kept)

    # --- cancel and clean up ----------------------------------------------------------------------

    def cancel(self, fast: bool = False) -> None:
        """Stop the job: workers skip its strips from now on, and its data is deleted from Redis.

        `fast`: fail at once if Redis is away (on Ctrl-C), instead of retrying for a minute."""
        records.cancel(self.record, self.ttl_s, records.fast_client() if fast else None)
        self.kept.clear()
        self.kept_bytes = 0

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
        self, job: Job, timeout_s: float, on_progress: Callable[[int, int], None] | None, notice: Notice,
        eager: bool = False,
    ) -> None:
        self.job, self.timeout_s, self.on_progress, self.notice = job, timeout_s, on_progress, notice
        self.eager = eager
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
        waited = time.monotonic() - self.start
        return POLL_FIRST_S if waited < FIRST_FOR_S else POLL_FAST_S if waited < FAST_FOR_S else POLL_SLOW_S

    def step(self) -> JobResult | None:
        """Look once: the result when the job is done, else None; raise when it failed or timed out."""
        job = self.job
        db = records.fast_client()
        try:
            now = time.monotonic()
            if job.kept and now >= self.next_redis_check:  # until the job is durable
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
                progress = records.progress(job.id, db)
                bad_file = status.input_error(job.record, progress) if job.spec.file else None
                if bad_file is not None:  # its worker could not decode the file: say so as the submitter would
                    raise InputError(f"{job.source or 'the input file'}: {bad_file}")
                raise JobFailed(f"job {job.id} failed: {status.failure_text(job.record, meta, progress)}")
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
            return self.job._collect(meta, time.monotonic() - self.start, self.eager)
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
    operations on 8-bit gray or BGR (`images.to_bgr8`). A file is read as it is sent
    (`source.py`): strips leave while later rows are still being decoded.
    """
    given = dict(params or {})
    given.update({k: v for k, v in (("low", low), ("high", high)) if v is not None})
    checked = Params(op=op, values=given, strips=strips, codec=Codec(codec), quality=int(quality)).validate()
    settings = settings or Settings.from_env()
    if isinstance(image, (str, Path)):
        return submit_file(Path(image), checked, settings=settings)
    return submit_pixels(image, checked, settings=settings)


def submit_file(
    path: Path, params: Params, output: str | None = None, settings: Settings | None = None,
    stages: Stages | None = None,
) -> Job:
    """Read `path` strip by strip and publish each strip as soon as its rows are decoded.

    `output` is recorded with the job, for `cli.py result` to write to later."""
    from luminagrid import source  # noqa: PLC0415 - publish needs this module

    settings = settings or Settings.from_env()
    stages = stages or Stages()
    with stages.timed("read"):
        src = source.open_source(path, settings.max_pixels)
    return submit_source(src, params, output, settings, stages)


def submit_source(
    src: Any, params: Params, output: str | None = None, settings: Settings | None = None,
    stages: Stages | None = None,
) -> Job:
    """Publish a job for an opened `source.Source` (how the CLI opens a file before it starts
    an embedded cluster, so that a bad file fails at once)."""
    stages = stages or Stages()
    if src.path is not None and not src.streamed:
        stages.note = f"{src.path} was decoded whole, not streamed: {src.whole_because}"
    job = _send(src, params, output, settings or Settings.from_env(), stages)
    if job.spec.file:
        stages.note = f"{src.path} went as its file, in one strip: small enough for one worker to decode it"
    return job


def submit_pixels(
    pixels: np.ndarray, params: Params, output: str | None = None, settings: Settings | None = None,
    stages: Stages | None = None,
) -> Job:
    """Send the chord for an (H, W) or (H, W, 3/4) uint8/uint16 image array, with validated `params`."""
    from luminagrid import source  # noqa: PLC0415

    settings = settings or Settings.from_env()
    images.check_pixels(pixels, settings.max_pixels, "the image")
    return _send(source.from_array(pixels), params, output, settings, stages or Stages())


def _send(src: Any, params: Params, output: str | None, settings: Settings, stages: Stages) -> Job:
    from luminagrid import publish  # noqa: PLC0415

    try:
        return publish.send(src, params, output, settings, stages)
    except REDIS_ERRORS as exc:
        raise BrokerUnreachable(
            f"could not submit to Redis at {broker.redacted(app.conf.broker_url)} ({exc}); check that it is "
            "up and that LUMINAGRID_BROKER_URL is right."
        ) from None
