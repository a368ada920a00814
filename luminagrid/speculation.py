"""Gray failures: strips that hang or crawl get a copy on another node; the first to finish wins.

A worker that dies is the liveness beat's business (`liveness.py`, `supervisor.py`). This is about
the ones that stay alive and stop making progress: a pool process stopped or stuck in a native
call, a node that crawls (throttled, swapping, starved). Every beat the supervisor looks at each
strip running on a live node, as its node measured it (`warden.Measure`), against what strips of
its class cost on this cluster (`costs.py`), and decides (`judge`, a pure function):

- **Hung**: its pool process used no CPU and moved no bytes for `LUMINAGRID_STALL_S` (3 s), or, once its class has
  a history, it burned `RUNAWAY_FACTOR` times the class's most expensive recent strip (plus
  `RUNAWAY_FLOOR_S`). Both hold before any history exists only in the first form: a strip of a
  class that never finished anywhere is judged by stalls alone. A hung strip gets a copy on
  another node at once. Its process is stopped once the copy finished (then Celery finds the
  result stored and acknowledges the message: no retry, no delivery counted against the strip).
  A strip that hung on every node that runs its operation fails its job, naming the strip; on a
  cluster of one node the hung process is stopped at once and Celery runs the strip again in a
  new pool process, within `LUMINAGRID_MAX_DELIVERIES`.
- **Slow** (a straggler, as in LATE, Zaharia et al., OSDI 2008): when a job's unfinished strips
  are all running and a node that runs the operation has a free pool process, a strip whose
  process progresses at under `SLOW_RATE` of full speed and whose estimated time left (its class's
  expected CPU minus what it used, at its own rate) exceeds `SLOW_FACTOR` times what a copy would
  take gets one copy there. A strip running at full speed is never copied, however long it takes.

A copy is the same task (same id, same payload claim), published to the chosen node's own queue
(`worker_direct`). Whichever run stores its result first wins: the backend refuses the other's
writes and chord join (`backend.py`), and the supervisor orders the losers' processes stopped
(`warden.py`). Celery's `revoke(terminate=True)` is not used: it is by task id, which the copies
share, so it would store REVOKED over the winner's result, join the chord with a failure, and
leave the id in every worker's revoked set, refusing a later legitimate re-run.

Copies are recorded per strip (`record.copies` reads them), for `cli.py status` and benchmarks.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from celery.utils.nodenames import worker_direct

from luminagrid import costs
from luminagrid import record as records
from luminagrid.backend import strip_of
from luminagrid.liveness import Hold, Node
from luminagrid.record import Record
from luminagrid.settings import COPIES_KEY, HANGS_KEY, PROGRESS_KEY, STOP_KEY, Settings

log = logging.getLogger(__name__)
#: Runaway: CPU beyond this many times the class's most expensive recent strip, plus the floor.
RUNAWAY_FACTOR = 10.0
RUNAWAY_FLOOR_S = 10.0
#: Slow: under this share of full speed, with this much more time left than a copy would take.
SLOW_RATE = 0.5
SLOW_FACTOR = 2.0
#: A strip's rate is trusted after it ran this long, in seconds.
MIN_OBSERVED_S = 1.0
#: What a copy costs beyond its CPU (a message, a payload fetched), in seconds.
COPY_OVERHEAD_S = 0.25
#: Stop orders a node has not taken within this long lapse, in seconds.
STOP_ORDER_TTL_S = 60
#: A stop order is given again if the run it names is still reported this long after, in seconds.
ORDER_AGAIN_S = 2.0
#: A copy sent to a live worker that does not run it yet (busy) is waited for this long, in seconds.
PENDING_S = 60.0


@dataclass(frozen=True)
class Run:
    """One run of a strip in a pool process on a live node."""

    job: str
    index: int
    node: Node
    hold: Hold


@dataclass(frozen=True)
class Launch:
    """Start a copy of strip `index` of `job` on node `target`."""

    job: str
    index: int
    target: Node
    reason: str  # "hung" or "slow"
    why: str  # one line for the events
    origin: str  # the node whose run it copies


@dataclass(frozen=True)
class Stop:
    """Stop the pool process `pid` on `node` that runs `task_id`."""

    node: str
    task_id: str
    pid: int
    reason: str


@dataclass(frozen=True)
class Fail:
    """Fail `job`: strip `index` hung on every node that could run it."""

    job: str
    index: int
    text: str


@dataclass
class Plan:
    """What one beat decided."""

    launches: list[Launch] = field(default_factory=list)
    stops: list[Stop] = field(default_factory=list)
    fails: list[Fail] = field(default_factory=list)
    #: (job, index) -> nodes where it was judged hung this beat
    hangs: dict[tuple[str, int], list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Facts:
    """What `judge` needs to know of the cluster and its jobs, read in a few round trips."""

    nodes: list[Node]
    jobs: dict[str, Record]
    #: job id -> which of its running, copied or hung strips stored a final state
    finished: dict[str, set[int]]
    #: job id -> how many of its strips stored a final state
    done: dict[str, int]
    #: cost class -> recent cost
    costs: dict[str, costs.Cost]
    #: (job, index) -> nodes on which it was judged hung before
    hung_on: dict[tuple[str, int], set[str]]
    #: (job, index) -> copies started so far (records as in `copies`)
    copied: dict[tuple[str, int], list[dict[str, Any]]]
    #: (job, index) -> (hostname, pool pid) of the run whose result was stored
    winners: dict[tuple[str, int], tuple[str, int]]
    #: (job, index) -> node id of a copy sent but not yet seen running
    pending: dict[tuple[str, int], str]


def _eligible(node: Node, r: Record) -> bool:
    """Whether `node` runs `r`'s operation with the submitter's code (else a copy would fail there)."""
    return node.runs(r.spec.op, r.spec.package, r.spec.version)


def _expected_cpu_s(r: Record, index: int, cost: costs.Cost | None, worst: bool = False) -> float | None:
    if cost is None:
        return None
    s = r.plan()[index]
    return (cost.max_s_per_mp if worst else cost.median_s_per_mp) * costs.megapixels(s.bottom - s.top, r.spec.width)


def hung_reason(run: Run, r: Record, cost: costs.Cost | None, stall_s: float) -> str | None:
    """Why this run is hung, or None."""
    h = run.hold
    if h.idle_s >= stall_s:
        return f"its pool process {h.pid} on {run.node.id} used no CPU for {h.idle_s:.1f} s"
    worst = _expected_cpu_s(r, run.index, cost, worst=True)
    if worst is not None and h.cpu_s > RUNAWAY_FACTOR * worst + RUNAWAY_FLOOR_S:
        return (f"its pool process {h.pid} on {run.node.id} used {h.cpu_s:.1f} CPU s, over {RUNAWAY_FACTOR:g} times "
                f"the {worst:.2f} s its class's costliest recent strip took")
    return None


def rate_of(run: Run) -> float:
    """CPU seconds per second its process gets: the lower of its recent rate and its whole run's
    (one that just began to crawl, or one that crawled all along)."""
    h = run.hold
    return min(h.rate, h.cpu_s / h.run_s if h.run_s > 0 else 1.0)


def time_left_s(run: Run, expected_cpu_s: float) -> float | None:
    """Estimated seconds until this run finishes at its rate, or None if not yet known."""
    h = run.hold
    if h.run_s < MIN_OBSERVED_S:
        return None
    return max(0.0, expected_cpu_s - h.cpu_s) / max(rate_of(run), 0.01)


def judge(facts: Facts, stall_s: float) -> Plan:
    """Decide copies, stops and failures from one beat's facts (see the module's docstring)."""
    plan = Plan()
    live = [n for n in facts.nodes if n.alive]
    runs: dict[tuple[str, int], list[Run]] = defaultdict(list)
    for n in live:
        for h in n.running:
            strip = strip_of(h.task_id)
            if strip is not None and strip[0] in facts.jobs and h.pid and strip[1] < facts.jobs[strip[0]].spec.strips:
                runs[strip].append(Run(strip[0], strip[1], n, h))
    free = {n.id: n.free_slots for n in live}

    def pick(r: Record, avoid: set[str], need_free: bool) -> Node | None:
        nodes = [n for n in live if n.id not in avoid and _eligible(n, r) and (free[n.id] > 0 or not need_free)]
        if not nodes:
            return None
        best = max(nodes, key=lambda n: (free[n.id], -len(n.running)))
        free[best.id] -= 1
        return best

    for (job, index), strip_runs in sorted(runs.items()):
        r = facts.jobs[job]
        label = f"job {job}: strip {index + 1}/{r.spec.strips}"
        if index in facts.finished.get(job, set()):
            # Finished: stop the other runs of a strip that was copied or judged hung (a plain
            # run still showing as running is only acknowledging its own result).
            winner = facts.winners.get((job, index))
            if winner is not None and ((job, index) in facts.copied or (job, index) in facts.hung_on):
                for run in strip_runs:  # (the winner, still acknowledging, is left alone)
                    if (run.node.hostname, run.hold.pid) != winner:
                        plan.stops.append(Stop(run.node.id, run.hold.task_id, run.hold.pid,
                                               f"{label} finished elsewhere first"))
            continue
        cost = facts.costs.get(costs.class_of(r.spec))
        hung = {run.node.id: why for run in strip_runs if (why := hung_reason(run, r, cost, stall_s))}
        if hung:
            plan.hangs[(job, index)] = sorted(hung)
        if len(hung) < len(strip_runs) or (job, index) in facts.pending:
            continue  # a healthy run (or a copy on its way) carries it: stop the hung one when it wins
        visited = facts.hung_on.get((job, index), set()) | set(hung)
        holders = {run.node.id for run in strip_runs}
        target = pick(r, visited | holders, need_free=False)
        first = next(iter(hung.values()))
        if target is not None:
            plan.launches.append(Launch(job, index, target, "hung", f"{label} is hung ({first}); "
                                        f"started a copy on {target.id}", origin=strip_runs[0].node.id))
        elif any(_eligible(n, r) for n in live if n.id not in holders) or len(visited) > 1:
            # Every node that runs the operation saw it hang: it is the strip, not the nodes.
            s = r.plan()[index]
            plan.fails.append(Fail(job, index, (
                f"strip {index + 1}/{r.spec.strips} (rows {s.row0}-{s.row1}) hung on every worker it ran on "
                f"({', '.join(sorted(visited))}): each time its process stopped making progress ({first}); "
                "check that image region and the operation's parameters, and the workers' logs")))
            plan.stops += [Stop(run.node.id, run.hold.task_id, run.hold.pid, f"{label}: its job failed")
                           for run in strip_runs]
        else:  # no other node: a new pool process here runs it again (Celery's retry on a lost process)
            plan.stops += [Stop(run.node.id, run.hold.task_id, run.hold.pid, f"{label} is hung ({why})")
                           for run in strip_runs if (why := hung.get(run.node.id))]

    # Stragglers: only with free pool processes, only jobs whose every unfinished strip is running.
    if not any(v > 0 for v in free.values()):
        return plan
    candidates: list[tuple[float, Run, str]] = []
    for job, r in facts.jobs.items():
        finished = facts.finished.get(job, set())
        unfinished = sorted({i for j, i in runs if j == job and i not in finished})
        if not unfinished or len(unfinished) < r.spec.strips - facts.done.get(job, 0):
            continue  # some unfinished strip waits in a queue: an idle worker takes it, no copy needed
        cost = facts.costs.get(costs.class_of(r.spec))
        for i in unfinished:
            if len(runs[(job, i)]) != 1 or (job, i) in facts.copied or (job, i) in plan.hangs or (job, i) in facts.pending:
                continue
            run = runs[(job, i)][0]
            expected = _expected_cpu_s(r, i, cost)
            left = None if expected is None else time_left_s(run, expected)
            if expected is None or left is None:
                continue
            rate = rate_of(run)
            copy_s = expected + COPY_OVERHEAD_S
            if rate < SLOW_RATE and left > SLOW_FACTOR * copy_s:
                candidates.append((left, run, f"runs at {rate:.0%} of full speed on {run.node.id}: "
                                              f"about {left:.1f} s left, a copy takes about {copy_s:.1f} s"))
    for left, run, why in sorted(candidates, key=lambda c: -c[0]):
        r = facts.jobs[run.job]
        target = pick(r, {run.node.id}, need_free=True)
        if target is not None:
            plan.launches.append(Launch(run.job, run.index, target, "slow",
                                        f"job {run.job}: strip {run.index + 1}/{r.spec.strips} {why}; "
                                        f"started a copy on {target.id}", origin=run.node.id))
    return plan


class Speculator:
    """Carries out `judge`'s plans for the supervisor, remembering copies on their way."""

    def __init__(self, db: redis.Redis, settings: Settings, event: Callable[[str | None, str], None],
                 hset: Callable[[list[tuple[str, str, str]], int], None]) -> None:
        """`hset(fields, ttl_s)` writes (key, field, value) triples, each key expiring after `ttl_s`
        (fenced by the supervisor's lease)."""
        self.db, self.settings, self.event, self.hset = db, settings, event, hset
        #: (job, index) -> (node id, when) of copies sent but not yet seen running there
        self.pending: dict[tuple[str, int], tuple[str, float]] = {}
        #: stop orders given: (node, task id, pid) -> when (a node takes each at its next beat)
        self.ordered: dict[tuple[str, str, int], float] = {}
        #: jobs with a strip copied or hung here: their leftover runs are stopped once the job is over
        self.watched: set[str] = set()

    def beat(self, nodes: list[Node], jobs: list[Record], done: dict[str, int], now: float,
             publish: Callable[[Any, Any], None], fail: Callable[[Record, str], None]) -> Plan:
        """One beat: read the facts, judge, act. `done`: job id -> strips finished (the
        supervisor's count); `publish(signature, queue)` sends a copy; `fail(record, text)` fails
        a job (both fenced by the supervisor). Reads only what running strips, copies and hangs
        need: a few keys per job with a strip running, none that grows with its finished strips."""
        by_id = {r.id: r for r in jobs if r.state == records.RUNNING}
        running = {strip for n in nodes if n.alive for h in n.running if (strip := strip_of(h.task_id))}
        wanted = sorted({job for job, _ in running if job in by_id})
        # Copies on their way: seen running at their target, or its node is gone, or overdue.
        alive = {n.id for n in nodes if n.alive}
        holding = {(s, n.id) for n in nodes if n.alive for h in n.holds if (s := strip_of(h.task_id))}
        self.pending = {k: (node, t) for k, (node, t) in self.pending.items()
                        if (k, node) not in holding and node in alive and now - t < PENDING_S}
        # A job that is over (done, failed, cancelled) leaves the active jobs: stop what still runs
        # of it where a copy or a hang was (its losers, its hung processes).
        leftover = [Stop(n.id, h.task_id, h.pid, f"job {strip[0]} is over") for n in nodes if n.alive
                    for h in n.running if (strip := strip_of(h.task_id)) and strip[0] in self.watched
                    and strip[0] not in by_id and h.pid]
        self.watched = {job for job in self.watched if job in by_id or any(s.task_id.startswith(job) for s in leftover)}
        if not wanted:
            plan = Plan(stops=leftover)
            self._act(plan, by_id, {}, {}, now, publish, fail)
            return plan
        with self.db.pipeline(transaction=False) as pipe:
            for job in wanted:
                pipe.hgetall(HANGS_KEY.format(job=job))
                pipe.hgetall(COPIES_KEY.format(job=job))
            replies = pipe.execute()
        hung_on, copied = {}, {}
        for n, job in enumerate(wanted):
            hangs, launched = replies[2 * n: 2 * n + 2]
            hung_on.update({(job, int(i)): set(json.loads(v)) for i, v in hangs.items()})
            copied.update({(job, int(i)): json.loads(v) for i, v in launched.items()})
        looked = sorted({k for k in running if k[0] in by_id} | {k for k in copied.keys() | hung_on.keys()})
        with self.db.pipeline(transaction=False) as pipe:
            for job, index in looked:
                pipe.hexists(PROGRESS_KEY.format(job=job), str(index))
            states = pipe.execute()
        finished: dict[str, set[int]] = defaultdict(set)
        for (job, index), final in zip(looked, states):
            if final:
                finished[job].add(index)
        classes = sorted({costs.class_of(by_id[j].spec) for j in wanted})
        ended = [k for k in copied.keys() | hung_on.keys() if k[1] in finished.get(k[0], set()) and k in running]
        metas = records.metas([f"{j}.strip{i}" for j, i in ended], self.db)
        winners = {}
        for k, meta in zip(ended, metas):
            worker = str(meta["result"].get("worker", "")) if meta and isinstance(meta.get("result"), dict) else ""
            host, _, pid = worker.rpartition("[")
            if pid.rstrip("]").isdigit():
                winners[k] = (host, int(pid.rstrip("]")))
        facts = Facts(nodes=nodes, jobs={j: by_id[j] for j in wanted}, finished=dict(finished), done=done,
                      costs=costs.read(self.db, classes), hung_on=hung_on, copied=copied, winners=winners,
                      pending={k: node for k, (node, _) in self.pending.items()})
        plan = judge(facts, self.settings.stall_s)
        plan.stops += leftover
        self.watched |= {job for job, _ in [*plan.hangs, *copied, *hung_on]} | {x.job for x in plan.launches}
        self._act(plan, by_id, hung_on, copied, now, publish, fail)
        return plan

    def _act(self, plan: Plan, jobs: dict[str, Record], hung_on: dict[tuple[str, int], set[str]],
             copied: dict[tuple[str, int], list[dict[str, Any]]], now: float,
             publish: Callable[[Any, Any], None], fail: Callable[[Record, str], None]) -> None:
        from luminagrid.tasks import republish_strip  # noqa: PLC0415 - the tasks import the workers' side

        ttl = self.settings.result_ttl_s
        hangs = []
        for (job, index), nodes in plan.hangs.items():
            seen = sorted(hung_on.get((job, index), set()) | set(nodes))
            if seen != sorted(hung_on.get((job, index), set())):
                hangs.append((HANGS_KEY.format(job=job), str(index), json.dumps(seen)))
        if hangs:
            self.hset(hangs, ttl)
        for f in plan.fails:
            fail(jobs[f.job], f.text)
        for launch in plan.launches:
            queue = worker_direct(launch.target.hostname)
            republish_strip(jobs[launch.job], launch.index, publish=lambda sig, queue=queue: publish(sig, queue))
            entry = {"node": launch.target.id, "origin": launch.origin, "reason": launch.reason, "t": time.time()}
            listed = [*copied.get((launch.job, launch.index), []), entry]
            self.hset([(COPIES_KEY.format(job=launch.job), str(launch.index), json.dumps(listed))], ttl)
            self.pending[(launch.job, launch.index)] = (launch.target.id, now)
            self.event(launch.job, launch.why)
        given = {(x.node, x.task_id, x.pid): self.ordered[(x.node, x.task_id, x.pid)] for x in plan.stops
                 if (x.node, x.task_id, x.pid) in self.ordered}
        new_stops = [x for x in plan.stops if (x.node, x.task_id, x.pid) not in given
                     or now - given[(x.node, x.task_id, x.pid)] >= ORDER_AGAIN_S]
        if new_stops:
            self.hset([(STOP_KEY.format(node=stop.node), stop.task_id, json.dumps({"pid": stop.pid, "reason": stop.reason}))
                       for stop in new_stops], STOP_ORDER_TTL_S)
            given |= {(x.node, x.task_id, x.pid): now for x in new_stops}  # (only once written)
            for stop in new_stops:
                log.warning("supervisor: ordered %s to stop pool process %d (%s)", stop.node, stop.pid, stop.reason)
        self.ordered = given

