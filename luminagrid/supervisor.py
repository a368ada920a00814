"""The supervisor: recovery that runs inside the cluster and costs the same however long the queue.

Every worker's main process runs a `Supervisor` thread. The one holding the lease (`lease.py`: a
Redis key that expires `liveness_ttl_s` after its holder stops renewing it, its value naming the
holder and the epoch it took it in) acts; the others only try to take the lease. The leader
renews it by time, before any action a beat after the last renewal, and stops acting the moment
it is lost. Every action (restore, drop, publish, fail, delete) is fenced: it takes effect only if,
in the same atomic step, the lease is still held under the epoch the leader acted in, so a leader
paused mid-beat that wakes up after another took over changes nothing. A leader that loses the
lease, or takes it again, forgets everything it knew. Every beat (a quarter of
`LUMINAGRID_LIVENESS_TTL_S`, 0.5 s by default) the leader:

1. **Watches Redis's run id, and its own beat.** A restart can lose a message a worker was taking
   off the queue, a crash the last writes. After one, it waits until the workers have beaten
   again, then looks for lost messages (6). It waits the same way after its own beats were
   delayed (its process paused, or Redis stopped answering: every liveness record may have
   expired meanwhile, by Redis's clock, while the workers could not beat) and after taking the
   lease back.
2. **Judges liveness** (`liveness.py`): a node whose liveness record expired is lost. Its
   messages go back to the queue at once (3), and lost messages are looked for (6), since a node
   cut off by the network can take a message it never receives.
3. **Restores orphans**: a message in kombu's `unacked` hash that no live node holds (its node is
   lost, or a Redis restart made its node drop it) goes back to the head of its queue, as kombu's
   visibility-timeout sweep would do an hour later; if its task already finished (its
   acknowledgement was lost), it is dropped instead. A message its lost node reported goes back at
   once (and is struck from that node's holdings, since it keeps its delivery tag); one nobody
   reported, once every live node beat twice without it.
4. **Finishes stitches**: a job whose strips all finished but whose stitch is nowhere (not done,
   held, unacknowledged or in the stitch queue, which holds one message per job at most, on looks
   `grace_s` apart), e.g. because a Redis crash lost the chord's state, gets its stitch published
   again with the strips' stored results.
5. **Counts**: if fewer strips are queued than the active jobs account for (strips minus finished
   minus held), something was lost without a restart or a lost node: look (6).
6. **Looks for lost messages** (only after 1, 2 or 5, a takeover, or a client's request): the
   active jobs' strips that are neither finished, held, unacknowledged nor queued (the strip queue
   read a bounded page at a time), and still so `grace_s` later, are published again under their
   task ids from their records and payloads in Redis.
7. **Deletes cancelled jobs' data** once no live node holds their tasks any more.
8. **Copies strips that hang or crawl** on live nodes to other nodes, and has the losing runs
   stopped (`speculation.py`).

Steps 1-5 and 7 read O(workers + unacknowledged messages + active jobs) keys per beat; only step 6
reads the strip queue, and only after an event. A task recovered more than `MAX_RECOVERIES_PER_TASK`
times fails its job. Recoveries are logged at WARNING and kept in `settings.EVENTS_KEY` and the
job's events, for `cli.py status`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import kombu.exceptions
import msgpack
import redis
from celery import states
from celery.exceptions import ChordError
from celery.utils.nodenames import worker_direct

from luminagrid import claims, liveness, queues, speculation
from luminagrid.lease import Fence, Lease, LeaseLost
from luminagrid import record as records
from luminagrid.app import app
from luminagrid.backend import strip_of
from luminagrid.broker import client as redis_client
from luminagrid.errors import MessageError
from luminagrid.record import RUNNING, Record
from luminagrid.settings import (
    ACTIVE_JOBS_KEY,
    CANCEL_KEY,
    CANCELLED_JOBS_KEY,
    EVENTS_KEY,
    JOB_EVENTS_KEY,
    PROGRESS_KEY,
    PUBLISHER_KEY,
    QUEUE,
    QUEUES,
    RECOVERIES_KEY,
    RUN_KEY,
    STITCH_QUEUE,
    WALK_KEY,
    Settings,
)
from luminagrid.tasks import republish_stitch, republish_strip

log = logging.getLogger(__name__)
#: Redis cannot be reached: look again next beat. (Other Redis errors are bugs or misconfiguration.)
UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, OSError, kombu.exceptions.OperationalError)
#: Most messages restored or published again per beat (a burst after a big node is lost).
MAX_ACTIONS_PER_BEAT = 2000
#: Events kept in `EVENTS_KEY`.
MAX_EVENTS = 1000
#: A count shortfall must last this long before it triggers a look, and looks it triggers are
#: at least this far apart, in seconds.
COUNT_SHORT_S = 3.0
COUNT_WALK_EVERY_S = 30.0
#: A job still "publishing" whose submitter's key (`PUBLISHER_KEY`) was absent this long lost its
#: submitter mid-publish, in seconds (at least 2 liveness TTLs).
PUBLISHER_GRACE_S = 4.0
#: A task recovered more often than this fails its job: something keeps losing its data.
MAX_RECOVERIES_PER_TASK = 10
#: A lost strip whose payload is gone from Redis (a crash lost it) fails its job after this long,
#: unless its submitter, still waiting, writes it again meanwhile.
PAYLOAD_WAIT_S = 10.0

# A fenced write of `_publisher_gone`: cancel the job, free its payloads, stop watching it.
# K: cancel mark, active jobs, payload keys...; A: job id, cancel mark's lifetime (s).
_ABANDON_LUA = """
redis.call('SET', K[1], '1', 'EX', A[2])
for i = 3, #K do redis.call('DEL', K[i]) end
redis.call('ZREM', K[2], A[1])
return 1
"""
# K: the job's progress hash, the strip's result. A: the strip's index.
_FORGET_STRIP_LUA = """
redis.call('HDEL', K[1], A[1])
return redis.call('DEL', K[2])
"""
# K: the job's cancel mark, the active jobs. A: the mark's lifetime, the job id.
_END_JOB_LUA = """
redis.call('SET', K[1], '1', 'EX', A[1])
return redis.call('ZREM', K[2], A[2])
"""
_JSON_STATUS = re.compile(rb'\s*\{\s*"status"\s*:\s*"([A-Z_]+)"')


def state_of(head: bytes | None) -> str | None:
    """A Celery result's state from the first bytes of its stored value, without reading the rest.

    Celery stores `{"status": STATE, "result": ...}`, the status first (msgpack here; JSON if
    `result_serializer` says so). None if nothing is stored.
    """
    if not head:
        return None
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(head)
    try:
        unpacker.read_map_header()
        if unpacker.unpack() == "status":
            value = unpacker.unpack()
            return value if isinstance(value, str) else states.PENDING
    except (msgpack.OutOfData, ValueError, TypeError):
        pass
    match = _JSON_STATUS.match(head)
    return match.group(1).decode() if match else states.PENDING


@dataclass
class _Orphan:
    first_seen: float
    #: the live nodes' beat counts when it was first seen unheld
    seqs: dict[str, int]


@dataclass
class _Suspect:
    since: float
    payload_missing_since: float | None = None


@dataclass
class _View:
    """What one beat read: nodes, unacknowledged tags, active jobs and their progress."""

    nodes: list[liveness.Node]
    tags: list[str]
    jobs: list[Record]
    finished: dict[str, int] = field(default_factory=dict)  # job id -> strips finished
    _unacked_ids: set[str] | None = None

    @property
    def live(self) -> list[liveness.Node]:
        return [n for n in self.nodes if n.alive]

    @property
    def held_ids(self) -> set[str]:
        return {h.task_id for n in self.live for h in n.holds}


class Supervisor(threading.Thread):
    """Supervision, in a thread of a worker's main process (see the module's docstring)."""

    def __init__(self, node: str, settings: Settings) -> None:
        super().__init__(name="luminagrid-supervisor", daemon=True)
        self.node, self.settings = node, settings
        # Its own clients, failing fast: a beat that cannot reach Redis is simply repeated.
        # With sentinel:// URLs they follow the master through a failover (`broker.client`).
        sentinel = {"master": settings.sentinel_master, "sentinel_password": settings.sentinel_password}
        self.db = redis_client(settings.result_backend, retry=False, **sentinel)  # luminagrid's keys, results
        self.mq = redis_client(settings.broker_url, retry=False, **sentinel)  # queues, unacked
        self._same_redis = settings.result_backend == settings.broker_url
        self.lease = Lease(self.db, self.mq, node, settings.liveness_ttl_s, mirrored=not self._same_redis)
        self.fence = Fence(self.lease)
        # Not `_stop`: that is a method of `threading.Thread`, which `join()` calls once the thread
        # has ended (an Event there made every worker shutdown log a TypeError traceback).
        self._stopping = threading.Event()
        self._last_error = ""
        self.renewed_at = -math.inf
        #: when this thread last heard from Redis (a gap longer than `stale_after_s` makes it wait)
        self.contact_at = -math.inf
        self._forget_state()

    def _forget_state(self) -> None:
        self.speculator = speculation.Speculator(self.db, self.settings, self._event, self._fenced_hset)
        self.run_ids: tuple[str, ...] | None = None
        self.stable_since = time.monotonic()
        self.taken_back = False
        self.alive_before: set[str] = set()
        self.orphans: dict[str, _Orphan] = {}
        self.foreign: set[str] = set()
        self.walk_due: float | None = None
        self.walk_reason = ""
        self.suspects: dict[str, _Suspect] = {}
        self.stitch_suspects: dict[str, float] = {}
        self.records: dict[str, Record] = {}
        #: when each job still publishing was first seen so
        self.publisher_gone_since: dict[str, float] = {}
        # Long enough for a submitter to renew its key once Redis is back from an outage.
        self.publisher_grace_s = max(PUBLISHER_GRACE_S, 2 * self.settings.liveness_ttl_s)
        #: when each cancelled job was first seen cancelled
        self.cancelled_since: dict[str, float] = {}
        self.short_since: float | None = None
        self.last_count_walk = -math.inf

    @property
    def leading(self) -> bool:
        return self.lease.held

    @property
    def beat_s(self) -> float:
        return self.settings.beat_s

    @property
    def stale_after_s(self) -> float:
        """A gap between the supervisor's exchanges with Redis longer than this (its process was
        paused, or Redis stopped answering) may have let every liveness record expire while the
        workers could not beat: it waits for them to beat again before judging."""
        return self.beat_s + self.settings.liveness_ttl_s / 2

    @property
    def grace_s(self) -> float:
        """How long a task must stay unaccounted for before it counts as lost: 2 beats (a message a
        live node took is in `unacked` at once, and in the node's holds within a beat)."""
        return 2 * self.beat_s

    # --- the thread -------------------------------------------------------------------------------

    def run(self) -> None:
        while not self._stopping.wait(self.beat_s):
            try:
                self.tick()
                self._last_error = ""
            except LeaseLost as exc:
                log.warning("supervisor: %s stopped a beat: %s", self.node, exc)
                if not self.lease.held:
                    self._forget_state()
            except UNREACHABLE as exc:  # Redis away: look again next beat
                self._report(f"Redis unreachable ({exc}); retrying", exc_info=False)
            except Exception as exc:  # noqa: BLE001 - supervision must outlive a bug in one beat
                self._report(f"a beat failed: {exc!r}", exc_info=True)

    def _report(self, text: str, exc_info: bool) -> None:
        if text != self._last_error:  # once per distinct problem, not every half second
            log.warning("supervisor on %s: %s", self.node, text, exc_info=exc_info)
            self._last_error = text

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stopping.set()
        self.join(timeout_s)
        try:
            self.lease.release()
        except UNREACHABLE:
            pass
        self.fence.close()

    # --- one beat ---------------------------------------------------------------------------------

    def tick(self) -> None:
        now = time.monotonic()
        got = self._hold_lease()
        gap = self._contact()
        if not got:
            return
        self._watch_restarts(now)
        with self.db.pipeline(transaction=True) as pipe:  # GET and DEL: GETDEL needs Redis 6.2
            requested, _ = pipe.get(WALK_KEY).delete(WALK_KEY).execute()
        if requested:
            self._request_walk(requested.decode(errors="replace"), now)
        view = _View(nodes=liveness.read(self.db, prune=True), tags=queues.unacked_tags(self.mq), jobs=self._active_jobs())
        gap = max(gap, self._contact())
        now = time.monotonic()
        if gap > self.stale_after_s:
            # Its own beat was delayed: what it read may show workers as lost that could not beat
            # meanwhile. Wait for them to beat again, as after a Redis restart.
            self.stable_since = now
            log.warning("supervisor: %s heard nothing from Redis for %.1f s; judging liveness once workers "
                        "beat again", self.node, gap)
        stable = now - self.stable_since >= self.settings.liveness_ttl_s + self.beat_s
        if not stable:  # just after a restart every node looks lost: let them beat again first
            return
        self._judge(view, now)
        self._restore_orphans(view, now)
        self._check_jobs(view, now)
        self._purge_cancelled(view, now)
        if self.walk_due is not None and now >= self.walk_due:
            self._walk(view, now)
        self._confirm_lost(view, now)
        self._speculate(view, now)
        self._contact()

    def _contact(self) -> float:
        """Note that Redis just answered; the time since it last did, in seconds (0 the first time:
        a node that just started has no view to be stale)."""
        now = time.monotonic()
        gap = now - self.contact_at if self.contact_at > -math.inf else 0.0
        self.contact_at = now
        return gap

    def _hold_lease(self) -> int:
        """Renew the lease (1) or take it (2: a new epoch; everything known before is forgotten),
        or 0: another worker holds it."""
        held = self.lease.held
        got = self.lease.hold()
        if got == 0:
            if held:
                log.warning("supervisor: %s no longer holds the lease", self.node)
                self._forget_state()
            return 0
        self.renewed_at = time.monotonic()
        if got == 2:
            # Taken (again): whatever it knew, and whatever happened while nobody (or a lost or
            # paused node) supervised, is unknown. Forget it, and look for lost messages once.
            self._forget_state()
            # Taken back: its own lease lapsed, so its beats were held up (or Redis's were): wait
            # for the workers to beat again before judging them, even if Redis did not restart.
            self.taken_back = self.lease.retaken
            log.warning("supervisor: %s %s (lease %s)", self.node,
                        "took the lease back" if self.taken_back else "supervises now", self.lease.token)
            self._request_walk(f"{self.node} took over supervision", time.monotonic())
        return got

    def _keep_lease(self) -> None:
        """Before an action: renew the lease if a beat passed since it was last renewed; stop
        acting if another worker has it, or if it had lapsed and was taken again (the view this
        beat read is stale then), or if it heard nothing from Redis for longer than
        `stale_after_s` (paused mid-beat: wait for the workers to beat again)."""
        now = time.monotonic()
        if now - self.contact_at > self.stale_after_s:
            self.stable_since = now
            raise LeaseLost(f"heard nothing from Redis for {now - self.contact_at:.1f} s mid-beat; "
                            "judging liveness once workers beat again")
        # The step before this one ended with a reply from Redis: measure the next from here, so
        # that only one step (or a pause), not a whole beat of reads under load, can trip this.
        self.contact_at = now
        if now - self.renewed_at < self.beat_s:
            return
        got = self._hold_lease()
        self._contact()
        if got == 0:
            raise LeaseLost("another worker holds the lease")
        if got == 2:
            raise LeaseLost(f"the lease had lapsed; took it again as {self.lease.token}; a fresh view next beat")

    def _watch_restarts(self, now: float) -> None:
        ids: tuple[str, ...] = (str(self.db.info("server")["run_id"]),)
        if not self._same_redis:
            ids += (str(self.mq.info("server")["run_id"]),)
        if self.run_ids is None:  # just took over: did Redis restart since the last leader looked?
            seen = self.db.get(RUN_KEY)
            self.run_ids = tuple(seen.decode().split(",")) if seen else ()
            if self.run_ids == ids and not self.taken_back:
                self.stable_since = -math.inf  # no: what Redis holds now is as fresh as it gets
        if ids != self.run_ids:
            self.stable_since = now
            self.orphans.clear()
            if self.run_ids:
                # A Sentinel failover changes it too (another process is the master now), and loses
                # what the old master had not yet sent its replica: the same look finds it.
                self._event(None, "Redis restarted or failed over (new run id): looking for lost messages once "
                                  "workers beat again")
            self._request_walk("Redis restarted", now)
            self.db.set(RUN_KEY, ",".join(ids))
        self.run_ids = ids

    def _request_walk(self, reason: str, when: float) -> None:
        if self.walk_due is None or when < self.walk_due:
            self.walk_due, self.walk_reason = when, reason

    def _event(self, job: str | None, text: str) -> None:
        """Log something the supervisor did, and keep it for operators and the job's `status`."""
        log.warning("supervisor: %s", text)
        line = json.dumps({"t": time.time(), "job": job, "text": text})
        with self.db.pipeline(transaction=False) as pipe:
            pipe.lpush(EVENTS_KEY, line)
            pipe.ltrim(EVENTS_KEY, 0, MAX_EVENTS - 1)
            if job:
                pipe.rpush(JOB_EVENTS_KEY.format(job=job), line)
                pipe.expire(JOB_EVENTS_KEY.format(job=job), self.settings.result_ttl_s)
            pipe.execute()

    def _recovered(self, task_id: str, text: str) -> None:
        """A task was restored or published again: say so; fail its job if that keeps happening."""
        job = _job_of(task_id)
        self._event(job, text)
        key = RECOVERIES_KEY.format(job=job)
        with self.db.pipeline(transaction=False) as pipe:
            count, _ = pipe.hincrby(key, task_id, 1).expire(key, self.settings.result_ttl_s).execute()
        if count > MAX_RECOVERIES_PER_TASK:
            self._fail(job, MessageError(
                f"task {task_id} of job {job} was lost {count} times (the last: {text}); something keeps "
                "losing it: check Redis's persistence, the network and the workers' logs"))

    def _fail(self, job_id: str, error: Exception) -> None:
        """Mark a job failed with `error` (its stitch's result), fenced."""
        self._keep_lease()
        with self.fence.results():
            app.backend.mark_as_failure(job_id, error)

    # --- 2. liveness --------------------------------------------------------------------------

    def _judge(self, view: _View, now: float) -> None:
        alive = {n.id for n in view.live}
        live_hosts = {n.hostname for n in view.live}
        for n in view.nodes:
            if not n.alive and n.id in self.alive_before:
                self._event(None, f"worker {n.id} is lost (no beat for {self.settings.liveness_ttl_s:g} s); "
                                  f"it held {len(n.holds)} message(s)")
                self._request_walk(f"worker {n.id} lost", now)
                if n.hostname not in live_hosts:  # copies sent to its own queue: nobody will take them
                    self._keep_lease()
                    self.fence.delete(*queues.lists_of(worker_direct(n.hostname).name), broker=True)
        self.alive_before = alive

    # --- 3. orphans ---------------------------------------------------------------------------

    def _restore_orphans(self, view: _View, now: float) -> None:
        held_live = {h.tag for n in view.live for h in n.holds}
        held_lost = {h.tag: n.id for n in view.nodes if not n.alive for h in n.holds}
        live_hosts = {n.hostname for n in view.live}  # (a worker's own queue is keyed by its hostname)
        seqs = {n.id: n.seq for n in view.live}
        current = set(view.tags)
        self.orphans = {t: o for t, o in self.orphans.items() if t in current}
        self.foreign &= current
        due: list[tuple[str, str | None]] = []
        for tag in view.tags:
            if tag in held_live or tag in self.foreign:
                self.orphans.pop(tag, None)
            elif tag in held_lost:
                due.append((tag, held_lost[tag]))  # its holder is lost: no need to wait
            else:
                # Unreported: restore it once every node alive then has beaten twice since without it.
                o = self.orphans.setdefault(tag, _Orphan(now, seqs))
                if now - o.first_seen >= self.beat_s and all(seqs.get(i, s + 2) >= s + 2 for i, s in o.seqs.items()):
                    due.append((tag, None))
        if not due:
            return
        due = due[:MAX_ACTIONS_PER_BEAT]
        found = queues.unacked_tasks(self.mq, [t for t, _ in due])
        struck: dict[str, list[str]] = defaultdict(list)
        try:
            for tag, holder in due:
                self.orphans.pop(tag, None)
                if tag not in found:
                    if holder:
                        struck[holder].append(tag)
                    continue  # acknowledged meanwhile
                task_id, queue = found[tag]
                if queue not in QUEUES and strip_of(task_id) is not None and (holder or queue not in live_hosts):
                    # A copy sent to a lost worker's own queue: back there, nobody would take it.
                    self._keep_lease()
                    self.fence.drop(tag)
                    struck[holder].append(tag)
                    self._request_walk(f"a copy of {task_id} was lost with {holder}", now)
                    continue
                if queue not in QUEUES and strip_of(task_id) is None:
                    self.foreign.add(tag)  # another application's message: not ours to judge
                    continue
                whose = f"its worker {holder} is lost" if holder else "no live worker holds it"
                self._keep_lease()
                if self._finished(task_id):
                    self.fence.drop(tag)
                    log.warning("supervisor: dropped the unacknowledged message of finished task %s (%s)",
                                task_id, whose)
                elif self.fence.restore(tag):
                    self._recovered(task_id, f"restored task {task_id} to its queue ({whose})")
                if holder:  # struck only once put back (a refused restore leaves it the lost node's)
                    struck[holder].append(tag)
        finally:
            # A restored message keeps its delivery tag: once another node takes it, the lost node's
            # old holdings must not make it look lost again.
            for node, tags in struck.items():
                liveness.strike(self.db, node, tags)

    def _finished(self, task_id: str) -> bool:
        """Whether the task already stored its final result (or its job was cancelled)."""
        strip = strip_of(task_id)
        if strip is not None:
            return bool(self.db.hexists(PROGRESS_KEY.format(job=strip[0]), str(strip[1]))) \
                or records.is_cancelled(strip[0], self.db)
        return state_of(self.db.getrange(app.backend.get_key_for_task(task_id), 0, 63)) in states.READY_STATES

    # --- the jobs -----------------------------------------------------------------------------

    def _active_jobs(self) -> list[Record]:
        ids = [i.decode() for i in self.db.zrange(ACTIVE_JOBS_KEY, 0, -1)]
        need = [i for i in ids if i not in self.records or self.records[i].state == records.PUBLISHING]
        gone = []
        for job_id, raw in zip(need, self.db.mget([records.key(i) for i in need]) if need else []):
            try:
                if raw is None:
                    raise MessageError("no record")
                self.records[job_id] = Record.from_json(raw, self.settings.max_pixels)
            except MessageError:
                self.records.pop(job_id, None)
                gone.append(job_id)  # expired, collected, or not ours
        self.records = {i: r for i, r in self.records.items() if i in set(ids)}
        if gone:
            self.db.zrem(ACTIVE_JOBS_KEY, *gone)
        now = time.monotonic()
        publishing = [i for i, r in self.records.items() if r.state == records.PUBLISHING]
        beats = self.db.mget([PUBLISHER_KEY.format(job=i) for i in publishing]) if publishing else []
        for job_id, beat in zip(publishing, beats):
            if beat is not None:
                self.publisher_gone_since.pop(job_id, None)
            elif now - self.publisher_gone_since.setdefault(job_id, now) >= self.publisher_grace_s:
                self.publisher_gone_since.pop(job_id, None)
                self._publisher_gone(self.records[job_id], now)
        self.publisher_gone_since = {i: t for i, t in self.publisher_gone_since.items() if i in set(publishing)}
        return [self.records[i] for i in ids if i in self.records and self.records[i].state != records.CANCELLED]

    def _publisher_gone(self, r: Record, now: float) -> None:
        """A job's submitter stopped while publishing. If every strip's payload reached Redis,
        finish the job (publish what it did not send); else the rest of the image was never read:
        fail the job, skip the strips it did send and free their payloads."""
        with self.db.pipeline(transaction=False) as pipe:
            for i in range(r.spec.strips):
                pipe.exists(claims.key_for(r.id, "in", i))
            present = pipe.execute()
        if all(present):
            self._keep_lease()
            self.fence.set_chord_size(r.group_id, r.spec.strips)  # it may have died just before
            self.records[r.id] = r.with_state(RUNNING)
            self._event(r.id, f"job {r.id}: its submitter stopped while publishing; finishing the job")
            self._request_walk(f"job {r.id} left half published", now)
            return
        read = present.index(0)
        row = r.plan()[read].row0
        self._keep_lease()
        payloads = [claims.key_for(r.id, "in", i) for i in range(r.spec.strips)]
        self.fence.call(_ABANDON_LUA,  # its strips are skipped, their payloads freed
                        [CANCEL_KEY.format(job=r.id), ACTIVE_JOBS_KEY, *payloads], [r.id, self.settings.result_ttl_s])
        self._fail(r.id, MessageError(
            f"its submitter stopped after sending {read} of {r.spec.strips} strips (rows 0-{row} of "
            f"{r.spec.height}); the rest of the image never reached Redis: submit the image again"))
        verdict = app.backend.get_key_for_task(r.id)  # kept, with the record, for `status` to say why
        self.fence.delete(*(k for k in records.data_keys(r) if k != verdict))
        self.records.pop(r.id, None)
        self._event(r.id, f"job {r.id}: its submitter stopped after sending {read}/{r.spec.strips} strips; "
                          "failed the job")

    def _check_jobs(self, view: _View, now: float) -> None:
        """Progress of every active job in one round trip; then 4 (stitches) and 5 (counts)."""
        with self.db.pipeline(transaction=False) as pipe:
            for r in view.jobs:
                pipe.hlen(PROGRESS_KEY.format(job=r.id))
                pipe.getrange(app.backend.get_key_for_task(r.id), 0, 63)
            replies = pipe.execute()
        ended, waiting = [], []
        for r, finished, head in zip(view.jobs, replies[::2], replies[1::2]):
            view.finished[r.id] = int(finished)
            if state_of(head) in states.READY_STATES:
                ended.append(r.id)  # the stitch stored its result: nothing left to supervise
            elif r.state == RUNNING and int(finished) >= r.spec.strips:
                waiting.append(r)
        if ended:
            self.db.zrem(ACTIVE_JOBS_KEY, *ended)
        self.stitch_suspects = {j: t for j, t in self.stitch_suspects.items() if j in {r.id for r in waiting}}
        if waiting:
            self._finish_stitches(view, waiting, now)
        self._check_counts(view, now)

    # --- 4. stitches --------------------------------------------------------------------------

    def _finish_stitches(self, view: _View, waiting: list[Record], now: float) -> None:
        held = view.held_ids | self._unacked_ids(view)
        queued = queues.find_queued(self.mq, STITCH_QUEUE, {r.id for r in waiting} - held)
        for r in waiting:
            if r.id in held or r.id in queued:
                self.stitch_suspects.pop(r.id, None)
                continue
            since = self.stitch_suspects.setdefault(r.id, now)
            if now - since < self.grace_s:
                continue
            self._keep_lease()
            del self.stitch_suspects[r.id]
            strip_metas = records.metas([r.strip_task_id(i) for i in range(r.spec.strips)], self.db)
            missing = [i for i, m in enumerate(strip_metas) if m is None]
            if missing:  # counted as finished, but their results are gone: they run again
                self._keep_lease()
                for i in missing:  # `records.forget_strip`, fenced
                    result = app.backend.get_key_for_task(r.strip_task_id(i))
                    self.fence.call(_FORGET_STRIP_LUA, [PROGRESS_KEY.format(job=r.id), result], [i])
                self._request_walk(f"job {r.id}: results of strips {missing} are gone", now)
                continue
            failed = [i for i, m in enumerate(strip_metas) if m is not None and m["status"] != states.SUCCESS]
            if failed:  # the chord's own error handling did not mark the job
                i = failed[0]
                self._fail(r.id, ChordError(f"Dependency {r.strip_task_id(i)} failed"))
                self._event(r.id, f"job {r.id}: strip {i + 1}/{r.spec.strips} failed but the job was not marked "
                                  "failed; marked it")
                continue
            republish_stitch(r, [m["result"] for m in strip_metas], publish=self.fence.publish)
            self._recovered(r.id, f"job {r.id}: every strip is done but its stitch was nowhere; published the stitch again")

    def _unacked_ids(self, view: _View) -> set[str]:
        if view._unacked_ids is None:
            view._unacked_ids = {task for task, _ in queues.unacked_tasks(self.mq, view.tags).values()}
        return view._unacked_ids

    # --- 5. counts ----------------------------------------------------------------------------

    def _check_counts(self, view: _View, now: float) -> None:
        running = [r for r in view.jobs if r.state == RUNNING]
        held_per_job: dict[str, int] = defaultdict(int)
        for task_id in view.held_ids:
            strip = strip_of(task_id)
            if strip is not None:
                held_per_job[strip[0]] += 1
        expected = sum(max(0, r.spec.strips - view.finished.get(r.id, 0) - held_per_job[r.id]) for r in running)
        if not expected or sum(queues.queued_count(self.mq, q) for q in _strip_queues(view)) >= expected:
            self.short_since = None
            return
        self.short_since = self.short_since or now
        if now - self.short_since >= COUNT_SHORT_S and now - self.last_count_walk >= COUNT_WALK_EVERY_S:
            self.last_count_walk = now
            self._request_walk(f"fewer strips queued than the active jobs need ({expected})", now)

    # --- 6. lost messages ---------------------------------------------------------------------

    def _walk(self, view: _View, now: float) -> None:
        reason, self.walk_due = self.walk_reason, None
        running = [r for r in view.jobs if r.state == RUNNING]
        with self.db.pipeline(transaction=False) as pipe:
            for r in running:
                pipe.hkeys(PROGRESS_KEY.format(job=r.id))
            finished = [{int(i) for i in keys} for keys in pipe.execute()] if running else []
        accounted = view.held_ids | self._unacked_ids(view)
        wanted = {
            r.strip_task_id(i) for r, done in zip(running, finished) for i in range(r.spec.strips) if i not in done
        } - accounted
        queued: set[str] = set()
        for queue in _strip_queues(view):  # (the strip queue, and each live worker's own: copies, redirects)
            if wanted - queued:
                queued |= queues.find_queued(self.mq, queue, wanted - queued, between_pages=self._keep_lease)
        lost = wanted - queued
        for task_id in lost:
            self.suspects.setdefault(task_id, _Suspect(now))
        log.warning("supervisor: looked for lost messages (%s): %d unfinished strip(s) not held, %d queued, %d not found",
                    reason, len(wanted), len(queued), len(lost))

    def _confirm_lost(self, view: _View, now: float) -> None:
        due = [t for t, s in self.suspects.items() if now - s.since >= self.grace_s]
        if not due:
            return
        accounted = view.held_ids | self._unacked_ids(view)
        by_job: dict[str, list[int]] = defaultdict(list)
        for task_id in due:
            strip = strip_of(task_id)
            if strip is None or task_id in accounted or strip[0] not in self.records:
                self.suspects.pop(task_id, None)
            else:
                by_job[strip[0]].append(strip[1])
        actions = 0
        for job_id, indices in by_job.items():
            r = self.records[job_id]
            with self.db.pipeline(transaction=False) as pipe:
                pipe.hmget(PROGRESS_KEY.format(job=job_id), [str(i) for i in indices])
                pipe.exists(CANCEL_KEY.format(job=job_id))
                for i in indices:
                    pipe.exists(claims.key_for(job_id, "in", i))
                done, cancelled, *present = pipe.execute()
            for i, state, has_payload in zip(indices, done, present):
                task_id = r.strip_task_id(i)
                if state is not None or cancelled:
                    self.suspects.pop(task_id, None)  # it finished after all, or nobody wants it
                elif actions >= MAX_ACTIONS_PER_BEAT:
                    continue  # next beat
                elif has_payload:
                    actions += 1
                    self._keep_lease()
                    republish_strip(r, i, publish=self.fence.publish)
                    self.suspects.pop(task_id, None)
                    self._recovered(task_id, f"job {job_id}: strip {i + 1}/{r.spec.strips} was lost (found nowhere); "
                                             "published it again")
                else:
                    self._payload_gone(r, i, now)

    def _payload_gone(self, r: Record, index: int, now: float) -> None:
        """A lost strip whose payload is gone too: wait for its submitter to write it again, then fail."""
        suspect = self.suspects[r.strip_task_id(index)]
        suspect.payload_missing_since = suspect.payload_missing_since or now
        if now - suspect.payload_missing_since < PAYLOAD_WAIT_S:
            return
        self._fail(r.id, MessageError(
            f"strip {index + 1}/{r.spec.strips} was lost and its pixels are gone from Redis (did Redis crash right "
            "after the job was submitted?); submit the image again"))
        self.suspects.pop(r.strip_task_id(index), None)
        self._event(r.id, f"job {r.id}: strip {index + 1} was lost with its payload; failed the job")

    # --- 8. strips that hang or crawl ----------------------------------------------------------

    def _speculate(self, view: _View, now: float) -> None:
        """Step 8, last: a bug in it must not keep the recovery steps from running."""
        try:
            self.speculator.beat(view.nodes, view.jobs, view.finished, now, self._publish_copy, self._fail_hung)
        except (LeaseLost, *UNREACHABLE):
            raise
        except Exception as exc:  # noqa: BLE001 - reported once per distinct problem, like a failed beat
            self._report(f"judging running strips failed: {exc!r}", exc_info=True)

    def _publish_copy(self, signature: Any, queue: Any) -> None:
        """Send a speculative copy of a strip to one node's own queue (fenced)."""
        self._keep_lease()
        self.fence.publish(signature, queue=queue)

    def _fail_hung(self, r: Record, text: str) -> None:
        """Fail job `r` with `text` (its strips are skipped from now on; its record and verdict stay,
        for `status` to say why)."""
        self._fail(r.id, MessageError(text))  # first the verdict: a job ended without one would wait forever
        self._keep_lease()
        self.fence.call(_END_JOB_LUA, [CANCEL_KEY.format(job=r.id), ACTIVE_JOBS_KEY], [self.settings.result_ttl_s, r.id])
        self.records.pop(r.id, None)
        self._event(r.id, f"job {r.id} failed: {text}")

    def _fenced_hset(self, fields: list[tuple[str, str, str]], ttl_s: int) -> None:
        if fields:
            self._keep_lease()
            self.fence.hset(fields, ttl_s)

    # --- 7. cancelled jobs --------------------------------------------------------------------

    def _purge_cancelled(self, view: _View, now: float) -> None:
        """Delete a cancelled job's data once more, 2 beats after this supervisor first saw it
        cancelled and once no live node holds its tasks (strips check for a cancel before
        decoding and again before storing their output, so nothing comes back after)."""
        entries = [e.decode() for e in self.db.zrange(CANCELLED_JOBS_KEY, 0, -1)]
        self.cancelled_since = {j: t for j, t in self.cancelled_since.items() if j in set(entries)}
        held_jobs = {_job_of(t) for t in view.held_ids}
        for job_id in entries:
            if job_id in held_jobs or now - self.cancelled_since.setdefault(job_id, now) < 2 * self.beat_s:
                continue
            raw = self.db.get(records.key(job_id))
            if raw is not None:
                try:
                    keys = records.data_keys(Record.from_json(raw, self.settings.max_pixels))
                except MessageError:
                    keys = []
                if keys:
                    self._keep_lease()
                    self.fence.delete(*keys)
            self.db.zrem(CANCELLED_JOBS_KEY, job_id)


def _strip_queues(view: _View) -> list[str]:
    """Where a strip message may wait: the strip queue, and each live worker's own queue."""
    return [QUEUE, *sorted({worker_direct(n.hostname).name for n in view.live})]


def _job_of(task_id: str) -> str:
    strip = strip_of(task_id)
    return strip[0] if strip else task_id
