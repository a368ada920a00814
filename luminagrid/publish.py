"""Sending a job: its record, then every strip as soon as its rows are read, then "running".

    job = publish.send(source, params, output, settings, stages)

The rows come from a `source.Source` (a file streamed by libvips, or an array), read ahead in a
thread of their own (`source.ReadAhead`; the command line starts it before it imports Celery), so
decoding overlaps converting, encoding and publishing. Each strip is
converted (`Operation.prepare`: gray or BGR; pixel-local, so per strip is exact), encoded, stored
under its claim key, then published as a chord header task: the strips' group is the job's
chord, whose size is set just before the last strip goes out (as Celery's own chord does).
Only a strip and its halos, and the payloads of the last `DURABLE_S` seconds, are held.

A small image (a streamable file of at most one strip's pixels: `source.sends_file`) goes as its
file, in a job of one strip whose worker decodes it (`JobSpec.file`): the submitter reads only
the header, so in a batch the decoding, the heaviest part of a small job, spreads over the workers.

An error while reading (a truncated file found mid-stream) or publishing cancels what went out.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import redis

from luminagrid import claims, codec, messages, source
from luminagrid import record as records
from luminagrid.app import app
from luminagrid.errors import JobCancelled
from luminagrid.jobs import REDIS_ERRORS, Job, Params
from luminagrid.record import Record
from luminagrid.settings import PUBLISHER_KEY, Settings
from luminagrid.source import Source
from luminagrid.stages import Stages
from luminagrid.strips import Strip
from luminagrid.tasks import strip_signature

#: How often a long publish checks that Redis did not restart (and forgets payloads on disk), in s.
WATCH_EVERY_S = 0.5
#: How often the publisher renews `PUBLISHER_KEY`, and how long the key lives, in seconds (at least
#: the fast client's 5 s socket timeout plus two beats).
PUBLISHER_BEAT_S = 0.5
PUBLISHER_TTL_S = 6.0


class _Publisher:
    """Says "this job's submitter is alive and publishing" in Redis until stopped.

    A thread of its own renews the key, so a slow read (a huge strip, a slow disk) does not
    look like a dead submitter; a Redis outage only pauses it.
    """

    def __init__(self, job_id: str, ttl_s: float) -> None:
        # It outlives one beat stalled for a whole socket timeout (an fsync, a fork, a hiccup).
        self.key, self.ttl_ms = PUBLISHER_KEY.format(job=job_id), int(max(ttl_s, PUBLISHER_TTL_S) * 1000)
        self.db = records.fast_client()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="luminagrid-publisher", daemon=True)

    def first_beat(self, pipe: redis.client.Pipeline) -> None:
        """The first beat, in the pipeline that writes the job's record; then the thread's."""
        pipe.set(self.key, "1", px=self.ttl_ms)

    def _beat(self) -> None:
        while not self.stop.wait(PUBLISHER_BEAT_S):
            try:
                self.db.set(self.key, "1", px=self.ttl_ms)
            except REDIS_ERRORS:
                pass  # Redis is away: the supervisor waits for us a while once it is back

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        """Stop beating; the key lapses by itself (the job is no longer "publishing" by then)."""
        if self.stop.is_set():
            return
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(5)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) while publishing: what went out of job `job_id` was cancelled (if Redis
    could be reached: `cancelled`)."""

    def __init__(self, job_id: str, cancelled: bool) -> None:
        super().__init__(job_id)
        self.job_id, self.cancelled = job_id, cancelled


def plan_for(src: Source, params: Params) -> tuple[messages.JobSpec, list[Strip]]:
    """The job's message and strip plan, from the image's header alone (`source.plan_for`)."""
    op = params.operation
    file, plan = source.plan_for(src, params)
    spec = messages.JobSpec.create(
        op, params.values, id=str(uuid.uuid4()), width=src.width, height=src.height,
        channels=3 if op.colour and src.channels >= 3 else 1, strips=len(plan), codec=params.codec,
        quality=params.quality, file=file,
    )
    return spec, plan


def _payloads(src: Source, spec: messages.JobSpec, plan: list[Strip], stages: Stages) -> Iterator[tuple[Strip, bytes]]:
    """Each strip with its encoded pixels, as they are read; a `file` job's one strip with its file."""
    if spec.file:
        assert src.path is not None
        with stages.timed("read"):
            data = src.path.read_bytes()
        stages.log("read", spec.height)
        yield plan[0], data
        return
    op = spec.operation
    reader = src.read_ahead(plan, stages)  # the command line may have started it already
    try:
        for s, rows in reader:
            with stages.timed("convert"):
                pixels = op.prepare(rows)
            with stages.timed("encode"):
                data = codec.encode_strip(pixels, spec.codec, spec.quality)
            yield s, data
    finally:
        reader.close()


def send(src: Source, params: Params, output: str | None, settings: Settings, stages: Stages | None = None) -> Job:
    """Publish a job for `src` with validated `params`; return it as soon as the last strip is out.

    Raises `InputError` if reading fails mid-stream (what went out is cancelled first) and
    `BrokerUnreachable`-worthy Redis errors as they come (the caller maps them).
    """
    spec, plan = plan_for(src, params)
    rec = Record(spec=spec, output=output, submitted_at=time.time())
    job = Job(record=rec, stages=stages or Stages(), ttl_s=settings.result_ttl_s,
              source=src.path if spec.file else None)
    db = records.client()
    publisher = _Publisher(spec.id, settings.liveness_ttl_s)
    with db.pipeline(transaction=False) as pipe:  # one round trip: Redis's run id, the first beat, the record
        pipe.info("server")
        publisher.first_beat(pipe)
        rec.save(settings.result_ttl_s, pipe)  # "publishing": if we die now, the supervisor sees PUBLISHER_KEY lapse
        job.run_id = str(pipe.execute()[0]["run_id"])
    publisher.start()
    next_watch = time.monotonic() + WATCH_EVERY_S
    try:
        with app.producer_or_acquire() as producer:
            for s, data in _payloads(src, spec, plan, job.stages):
                key = claims.key_for(spec.id, "in", s.index)
                with job.stages.timed("publish"):
                    db.set(key, data, ex=settings.result_ttl_s)  # before the message that names it
                    if s.index == len(plan) - 1:
                        app.backend.set_chord_size(rec.group_id, len(plan))
                    payload = data if len(data) <= settings.inline_max_bytes else {"claim": key}
                    strip_signature(rec, s, payload, in_chord=True).apply_async(producer=producer)
                job.keep(key, data)
                job.stages.mark("first strip published")
                job.stages.log("published", s.index + 1)
                if time.monotonic() >= next_watch:  # Redis restarted meanwhile? (and forget what is on disk)
                    job._watch_redis(db, lambda _text: None)
                    if records.is_cancelled(spec.id, db):  # by someone else, or ended by the cluster
                        raise JobCancelled(f"job {spec.id} was cancelled or ended by the cluster while it was "
                                           f"being sent; python cli.py status {spec.id} says why.")
                    next_watch = time.monotonic() + WATCH_EVERY_S
        job.stages.mark("last strip published")
        job._watch_redis(db, lambda _text: None)  # did Redis restart while we published?
        job.record = rec.with_state(records.RUNNING)
        records.mark_running(rec, settings.result_ttl_s)  # not if it was cancelled meanwhile
        publisher.close()  # in here: Ctrl-C while it stops cancels the job too
    except (*REDIS_ERRORS, Exception, KeyboardInterrupt) as exc:
        cancelled = False
        try:
            job.cancel(fast=True)  # what went out must not run on, unwanted
            cancelled = True
        except REDIS_ERRORS:
            pass  # Redis is away: the supervisor ends the job once it is back and we are gone
        if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, Interrupted):
            raise Interrupted(spec.id, cancelled) from None
        raise
    finally:
        publisher.close()  # (again: idempotent)
    return job
