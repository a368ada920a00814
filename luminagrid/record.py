"""A job's record in Redis: what any machine needs to follow, recover, cancel or collect the job.

A job is written to Redis before its first message: the record (`settings.JOB_KEY`: the job
message, output path, submit time, state), every strip's payload under its claim key, and the
job's entry in the supervisor's set of active jobs. So a worker's supervisor can publish any strip
again, or the stitch, without the submitter; `cli.py status/result/cancel` work from anywhere.

Task ids are fixed by the job id: strip i is `<job>.strip<i>`, the strips' group `<job>.strips`,
the stitch `<job>`. Everything expires with the job's results (`LUMINAGRID_RESULT_TTL_S`).

States: `publishing` (the submitter is still sending strips), `running`, `cancelled`.
Whether a job is done or failed is its stitch task's result, not a state here.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from typing import Any

import redis

from luminagrid import broker, claims, messages, strips
from luminagrid.app import app
from luminagrid.errors import JobNotFound, MessageError
from luminagrid.settings import (
    ACTIVE_JOBS_KEY,
    CANCEL_KEY,
    CANCELLED_JOBS_KEY,
    COPIES_KEY,
    HANGS_KEY,
    JOB_EVENTS_KEY,
    JOB_KEY,
    KILLS_KEY,
    PROGRESS_KEY,
    PUBLISHER_KEY,
    RECOVERIES_KEY,
    WALK_KEY,
)

PUBLISHING, RUNNING, CANCELLED = "publishing", "running", "cancelled"
STATES = (PUBLISHING, RUNNING, CANCELLED)


@dataclass(frozen=True)
class Record:
    """A job as stored in Redis."""

    spec: messages.JobSpec
    output: str | None
    submitted_at: float
    state: str = PUBLISHING

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def group_id(self) -> str:
        """The strips' group: the key of the chord join in Celery's Redis backend."""
        return f"{self.id}.strips"

    def strip_task_id(self, index: int) -> str:
        return f"{self.id}.strip{index}"

    @property
    def task_ids(self) -> list[str]:
        """Every task of the job: the strips in order, then the stitch (whose id is the job's)."""
        return [*(self.strip_task_id(i) for i in range(self.spec.strips)), self.id]

    def plan(self) -> list[strips.Strip]:
        return strips.plan_strips(self.spec.height, self.spec.strips, self.spec.halo_rows)

    def strip_label(self, s: strips.Strip) -> str:
        """What Flower and logs show for a strip task instead of kilobytes of pixels."""
        return f"job {self.id[:8]} {self.spec.op} strip {s.index + 1}/{self.spec.strips} rows {s.row0}-{s.row1}"

    @property
    def stitch_label(self) -> str:
        n = self.spec.strips
        return f"job {self.id[:8]} {self.spec.op} stitch {n} strip{'s' if n != 1 else ''}"

    # --- storage ----------------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps({**self.spec.to_message(), "output": self.output, "submitted_at": self.submitted_at,
                           "state": self.state})

    @classmethod
    def from_json(cls, raw: bytes | str, max_pixels: int, what: str = "a job record in Redis") -> Record:
        """A record as stored, every field checked as a message's; raise `MessageError` naming
        the bad field if it is not one (corrupt, forged, or not ours). `what` names it there."""
        try:
            return cls._parse(raw, max_pixels)
        except MessageError as exc:
            detail = str(exc).rstrip(".")
            raise MessageError(f"{what} is malformed: {detail}; delete it (or let it expire) and submit the image "
                               "again") from None

    @classmethod
    def _parse(cls, raw: bytes | str, max_pixels: int) -> Record:
        try:
            data = json.loads(raw)
        except (ValueError, TypeError) as exc:  # (UnicodeDecodeError is a ValueError)
            raise MessageError(f"it is not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise MessageError(f"it is a JSON {type(data).__name__}, not an object")
        # A record is read by supervisors too, on nodes that may lack its operation: they need
        # only its plan and keys, which it carries (the tasks check the operation, `messages.resolve`).
        spec = messages.parse_job(data, max_pixels, where=None)
        output = data.get("output")
        if output is not None and (not isinstance(output, str) or not output or "\0" in output):
            raise MessageError(f"field 'output' = {output!r} is not a file path")
        submitted_at: Any = data.get("submitted_at")
        if type(submitted_at) not in (int, float) or not math.isfinite(submitted_at):
            raise MessageError(f"field 'submitted_at' = {submitted_at!r} is not a time (seconds since 1970)")
        state = data.get("state", RUNNING)
        if state not in STATES:
            raise MessageError(f"field 'state' = {state!r} is not one of {', '.join(STATES)}")
        return cls(spec=spec, output=output, submitted_at=float(submitted_at), state=state)

    def save(self, ttl_s: int, pipe: redis.client.Pipeline | None = None) -> None:
        """Write the record and the job's place among the active jobs (in `pipe` if given)."""
        target = pipe if pipe is not None else client().pipeline(transaction=False)
        target.set(JOB_KEY.format(job=self.id), self.to_json(), ex=ttl_s)
        if self.state != CANCELLED:
            target.zadd(ACTIVE_JOBS_KEY, {self.id: self.submitted_at})
        if pipe is None:
            target.execute()

    def with_state(self, state: str) -> Record:
        return replace(self, state=state)


# The record says "running", and the job joins the active jobs, unless it was cancelled meanwhile.
_MARK_RUNNING_LUA = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
return 1
"""


def mark_running(record: Record, ttl_s: int, db: redis.Redis | None = None) -> bool:
    """Its strips are all published: say so in its record (False if it was cancelled meanwhile:
    a cancel is never undone)."""
    running = record.with_state(RUNNING)
    return bool((db or client()).eval(
        _MARK_RUNNING_LUA, 3, key(record.id), CANCEL_KEY.format(job=record.id), ACTIVE_JOBS_KEY,
        running.to_json(), ttl_s, record.submitted_at, record.id,
    ))


def client() -> redis.Redis:
    """Where luminagrid's own keys live: the result backend's Redis. Its client retries a command
    for up to a minute while Redis is away (`backend.retrying`): for writes that must land."""
    return app.backend.client


_fast: dict[tuple[str, str | None], redis.Redis] = {}


def fast_client() -> redis.Redis:
    """A client of the same Redis that fails at the first connection error: for loops that look
    again anyway (a waiting client), so they can notice an outage and keep their own deadline."""
    url = str(app.conf.result_backend).split("+", 1)[-1]
    # A Sentinel URL: the master's name and the sentinels' password are the backend's (`app.use_broker`).
    options = app.conf.result_backend_transport_options or {}
    master = options.get("master_name")
    password = (options.get("sentinel_kwargs") or {}).get("password")
    if (url, master) not in _fast:
        _fast[(url, master)] = broker.client(url, timeout_s=5.0, retry=False, master=master or None,
                                             sentinel_password=password)
    return _fast[(url, master)]


def key(job_id: str) -> str:
    return JOB_KEY.format(job=job_id)


def load(job_id: str, max_pixels: int) -> Record:
    """The record of job `job_id`, or raise `JobNotFound`."""
    raw = client().get(key(job_id))
    if raw is None:
        raise JobNotFound(
            f"no job {job_id!r} in Redis at {broker.redacted(app.conf.broker_url)}: it was never "
            "submitted there, was already collected, or expired; check the id and LUMINAGRID_BROKER_URL."
        )
    what = f"the record of job {job_id!r} in Redis ({key(job_id)})"
    found = Record.from_json(raw, max_pixels, what)
    if found.id != job_id:
        raise MessageError(f"{what} is malformed: it describes job {found.id!r}; delete it (or let it expire) "
                           "and submit the image again")
    return found


def progress(job_id: str, db: redis.Redis | None = None) -> dict[int, str]:
    """Strip index -> final state (SUCCESS or FAILURE) of the strips that finished."""
    return {int(k): v.decode() for k, v in (db or client()).hgetall(PROGRESS_KEY.format(job=job_id)).items()}


def metas(task_ids: list[str], db: redis.Redis | None = None) -> list[dict[str, Any] | None]:
    """Celery's stored result of each task (one MGET; None where nothing is stored yet)."""
    backend = app.backend
    raws = (db or client()).mget([backend.get_key_for_task(t) for t in task_ids]) if task_ids else []
    return [None if raw is None else backend.decode_result(raw) for raw in raws]


def kills(job_id: str, index: int, db: redis.Redis | None = None) -> dict[str, int]:
    """Worker hostname -> pool processes that died while running strip `index` of the job."""
    raw = (db or client()).hget(KILLS_KEY.format(job=job_id), str(index))
    try:
        found = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return {str(k): int(v) for k, v in found.items() if isinstance(v, int)} if isinstance(found, dict) else {}


# One more process of `hostname` died running the strip (KEYS: the job's kills hash; ARGV: index,
# hostname, lifetime in seconds).
_KILLED_LUA = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local seen = raw and cjson.decode(raw) or {}
seen[ARGV[2]] = (tonumber(seen[ARGV[2]]) or 0) + 1
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(seen))
redis.call('EXPIRE', KEYS[1], ARGV[3])
return seen[ARGV[2]]
"""


def killed(job_id: str, index: int, hostname: str, ttl_s: int, db: redis.Redis | None = None) -> None:
    """Remember that a pool process of worker `hostname` died while it ran strip `index`."""
    (db or client()).eval(_KILLED_LUA, 1, KILLS_KEY.format(job=job_id), str(index), hostname, ttl_s)


def copies(job_id: str, db: redis.Redis | None = None) -> list[dict[str, Any]]:
    """The speculative copies started for a job, oldest first: {"strip" (index), "node" (where
    the copy went), "origin" (the run it copies), "reason" ("hung" or "slow"), "t" (unix s),
    "outcome" ("won", "lost" or "running")}."""
    db = db or client()
    raw = db.hgetall(COPIES_KEY.format(job=job_id))
    if not raw:
        return []
    done = progress(job_id, db)
    items = sorted(((int(k), json.loads(v)) for k, v in raw.items()), key=lambda kv: kv[0])
    stored = metas([f"{job_id}.strip{i}" for i, _ in items], db)
    out = []
    for (index, launched), meta in zip(items, stored):
        result = (meta or {}).get("result")
        winner = str(result.get("worker", "")) if index in done and isinstance(result, dict) else ""
        for c in launched:
            host = str(c.get("node", "")).rpartition("[")[0]
            outcome = "running" if index not in done else "won" if winner.rpartition("[")[0] == host else "lost"
            out.append({"strip": index, **c, "outcome": outcome})
    return sorted(out, key=lambda c: c.get("t", 0))


def event_text(raw: bytes) -> str:
    """One of the supervisor's events (`settings.EVENTS_KEY`) as a line: local time, then what happened."""
    try:
        event = json.loads(raw)
        return f"{time.strftime('%H:%M:%S', time.localtime(float(event['t'])))} {event['text']}"
    except (ValueError, KeyError, TypeError):
        return raw.decode(errors="replace")


def exists(job_id: str, db: redis.Redis | None = None) -> bool:
    return bool((db or client()).exists(key(job_id)))


def request_walk(reason: str, db: redis.Redis | None = None) -> None:
    """Ask the supervisor to look for lost messages at its next beat (`supervisor.py`, step 6)."""
    (db or client()).set(WALK_KEY, reason, ex=3600)


def forget_strip(job_id: str, index: int, db: redis.Redis | None = None) -> None:
    """Unfinish strip `index`: its output is lost (a claim gone in a crash of Redis), so its result
    must not count. The supervisor then finds it nowhere and publishes it again."""
    with (db or client()).pipeline(transaction=True) as pipe:
        pipe.hdel(PROGRESS_KEY.format(job=job_id), str(index))
        pipe.delete(app.backend.get_key_for_task(f"{job_id}.strip{index}"))
        pipe.execute()


def reopen(record: Record, db: redis.Redis | None = None) -> None:
    """Unfinish the stitch: its output is lost, so the supervisor must stitch the job again."""
    with (db or client()).pipeline(transaction=True) as pipe:
        pipe.delete(app.backend.get_key_for_task(record.id))
        pipe.zadd(ACTIVE_JOBS_KEY, {record.id: record.submitted_at})
        pipe.set(WALK_KEY, f"job {record.id}'s output was lost", ex=3600)
        pipe.execute()


def is_cancelled(job_id: str, db: redis.Redis | None = None) -> bool:
    return bool((db or client()).exists(CANCEL_KEY.format(job=job_id)))


def data_keys(record: Record) -> list[str]:
    """Every key holding the job's data (not the record, not the cancel mark)."""
    backend = app.backend
    chord = [backend.get_key_for_group(record.group_id, suffix) for suffix in ("", ".j", ".t", ".s", ".d", ".c")]
    return [
        PROGRESS_KEY.format(job=record.id), JOB_EVENTS_KEY.format(job=record.id), RECOVERIES_KEY.format(job=record.id),
        PUBLISHER_KEY.format(job=record.id), COPIES_KEY.format(job=record.id), HANGS_KEY.format(job=record.id),
        KILLS_KEY.format(job=record.id),
        *(backend.get_key_for_task(t) for t in record.task_ids), *chord,
        *claims.keys_of(record.id, record.spec.strips, record.spec.fields),
    ]


def cancel(record: Record, ttl_s: int, db: redis.Redis | None = None) -> None:
    """Mark the job cancelled (its strips are skipped from now on) and delete its data.

    The supervisor deletes the data once more when no worker holds the job's tasks any more,
    in case a strip that was already running stored its output after this.
    """
    with (db or client()).pipeline(transaction=True) as pipe:
        pipe.set(CANCEL_KEY.format(job=record.id), "1", ex=ttl_s)
        record.with_state(CANCELLED).save(ttl_s, pipe)
        pipe.zrem(ACTIVE_JOBS_KEY, record.id)
        pipe.zadd(CANCELLED_JOBS_KEY, {record.id: time.time()})
        pipe.delete(*data_keys(record))
        pipe.execute()


def forget(record: Record) -> None:
    """Delete everything the job left in Redis (after its output was collected)."""
    with client().pipeline(transaction=True) as pipe:
        pipe.delete(key(record.id), *data_keys(record))
        pipe.zrem(ACTIVE_JOBS_KEY, record.id)
        pipe.execute()
