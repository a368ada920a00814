"""Worker liveness: each worker's main process beats into Redis; anyone can read who is alive.

A worker node (one `celery worker` main process) runs a `Beat` thread. Every `beat_s` (a quarter
of `LUMINAGRID_LIVENESS_TTL_S`) it writes, in one round trip:
- `alive:<node>`: a small record that expires after `liveness_ttl_s`, so a node that stops
  beating (SIGKILLed, frozen, cut off by the network) is seen as lost within that time,
  measured by Redis's own clock (no clock skew between machines matters);
- `holds:<node>`: every message the node holds (received, running or waiting for a retry's
  countdown), by delivery tag and task id; it outlives the liveness record, so a lost node's
  last holdings can still be shown;
- its name in the set of nodes.

The thread runs beside the worker's event loop, independent of its pool: a strip that computes for
an hour keeps its node alive. What the node holds is read from Celery's own worker state
(reserved, active and scheduled requests), so it cannot drift from what the worker really has.
A message received is reported within `POKE_S` (`poke`), so that a node lost right after it took
a message is known to have held it.

Each running strip's hold also says how it progresses in its pool process (`warden.Measure`:
pid, CPU and wall seconds, seconds without CPU progress), and the liveness record says how many
pool processes the node has and which operations (package, version) it runs: what the
supervisor needs to spot hung and crawling strips and to pick a node for a copy. In the same
round trip the beat takes the supervisor's stop orders for this node (`settings.STOP_KEY`) and
carries them out (`warden.Warden.stop`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis
from celery.worker import state as worker_state

from luminagrid.settings import ALIVE_KEY, HOLDS_KEY, NODES_KEY, STOP_KEY

if TYPE_CHECKING:
    from luminagrid.warden import Warden

log = logging.getLogger(__name__)
#: How long a lost node's last holdings are kept (for `status` and `workers`), in seconds.
HOLDS_TTL_S = 600
#: After a poke (a message received), the next beat comes this soon, but no sooner after the last.
POKE_S = 0.05


@dataclass(frozen=True)
class Hold:
    """One message a node holds."""

    task_id: str
    #: kombu's delivery tag: the message's key in the broker's `unacked` hash
    tag: str
    #: "running" (in a pool process), "reserved" (waiting for one) or "scheduled" (a retry's countdown)
    state: str
    #: a running strip's pool process and its progress (`warden.Measure`); 0 if not measured
    pid: int = 0
    run_s: float = 0.0
    cpu_s: float = 0.0
    idle_s: float = 0.0
    #: CPU seconds per second lately (1.0: full speed)
    rate: float = 1.0

    def row(self) -> list[Any]:
        """As stored in the node's holds record."""
        if not self.pid:
            return [self.task_id, self.tag, self.state]
        return [self.task_id, self.tag, self.state, self.pid, round(self.run_s, 3), round(self.cpu_s, 3),
                round(self.idle_s, 3), round(self.rate, 3)]

    @classmethod
    def from_row(cls, row: list[Any]) -> Hold:
        task_id, tag, state, *measure = row
        pid, run_s, cpu_s, idle_s, rate = [*measure, *[0, 0.0, 0.0, 0.0, 1.0][len(measure):]][:5]  # (older rows: fewer)
        return cls(str(task_id), str(tag), str(state), int(pid), float(run_s), float(cpu_s), float(idle_s), float(rate))


@dataclass(frozen=True)
class Node:
    """A worker node as its records in Redis describe it."""

    id: str
    hostname: str
    pid: int
    #: beats since the node started: a reader sees fresh news when it grows
    seq: int
    alive: bool
    #: seconds since its last beat, by Redis's clock (from the holds record's remaining lifetime)
    age_s: float | None
    holds: tuple[Hold, ...] = field(default_factory=tuple)
    #: its pool processes (strips it can run at once)
    slots: int = 1
    #: operation name -> "package version" of the code it runs them with
    ops: dict[str, str] = field(default_factory=dict)

    @property
    def running(self) -> list[Hold]:
        return [h for h in self.holds if h.state == "running"]

    def runs(self, op: str, package: str, version: str) -> bool:
        """Whether it runs operation `op` with this package's code (else a strip of it fails there)."""
        return self.ops.get(op) == f"{package} {version}" if self.ops else True

    @property
    def free_slots(self) -> int:
        """Pool processes not running or about to run anything."""
        return max(0, self.slots - sum(1 for h in self.holds if h.state in ("running", "reserved")))


def node_id(hostname: str, pid: int | None = None) -> str:
    """A node's id: its Celery hostname and main process id (unique even for equal hostnames)."""
    return f"{hostname}[{pid or os.getpid()}]"


def _requests() -> list[tuple[Any, str]] | None:
    """(request, state) for every message this process's worker holds, from Celery's state; None
    if the sets kept changing while read (from another thread than the one that changes them)."""
    for _ in range(10):
        try:
            running = set(worker_state.active_requests)
            held = [(r, "running") for r in running]
            held += [(r, "reserved") for r in tuple(worker_state.reserved_requests) if r not in running]
            held += [(r, "scheduled") for r in tuple(worker_state.scheduled_requests) if r not in running]
            return held
        except RuntimeError:  # "Set changed size during iteration"
            time.sleep(0.001)
    return None


def current_holds(warden: Warden | None = None,
                  requests: list[tuple[Any, str]] | None = None) -> list[Hold] | None:
    """What this worker holds now (running strips measured by `warden`), or None if it could not
    be read this time."""
    requests = _requests() if requests is None else requests
    if requests is None:
        return None
    measures = warden.measure(r for r, state in requests if state == "running") if warden else {}
    seen: set[str] = set()
    out = []
    for request, state in requests:
        tag = getattr(getattr(request, "message", None), "delivery_tag", None)
        if tag is not None and tag not in seen:
            seen.add(str(tag))
            m = measures.get(str(request.id)) if state == "running" else None
            out.append(Hold(task_id=str(request.id), tag=str(tag), state=state, pid=m.pid if m else 0,
                            run_s=m.run_s if m else 0.0, cpu_s=m.cpu_s if m else 0.0, idle_s=m.idle_s if m else 0.0,
                            rate=m.rate if m else 1.0))
    return out


def node_ops() -> dict[str, str]:
    """Operation name -> "package version" of every operation this process can run."""
    from luminagrid import ops  # noqa: PLC0415 - the operations import OpenCV: only in workers

    return {name: str(ops.origin(name)) for name in sorted(ops.REGISTRY)}


class Beat(threading.Thread):
    """Refreshes this node's liveness and holdings every `beat_s` until `stop()`."""

    def __init__(self, client: redis.Redis, hostname: str, ttl_s: float, slots: int = 1,
                 ops: dict[str, str] | None = None) -> None:
        super().__init__(name="luminagrid-beat", daemon=True)
        self.client, self.hostname, self.ttl_s = client, hostname, ttl_s
        self.slots, self.ops = slots, ops or {}
        self.id = node_id(hostname)
        self.seq = 0
        from luminagrid.warden import Warden  # noqa: PLC0415 - psutil: only in workers, not in clients

        self.warden = Warden()
        # Not `_stop`: that is a method of `threading.Thread`, which `join()` calls once the thread
        # has ended (an Event there made every worker shutdown log a TypeError traceback).
        self._stopping = threading.Event()
        self._poked = threading.Event()
        self._warned = False

    @property
    def interval_s(self) -> float:
        return self.ttl_s / 4

    def run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                requests = _requests()
                orders = self.beat(current_holds(self.warden, requests), take_orders=requests is not None)
                if orders:
                    self.warden.stop(orders, lambda: [r for r, state in (_requests() or []) if state == "running"])
                if self._warned:
                    log.warning("liveness: %s beats again", self.id)
                    self._warned = False
            except Exception as exc:  # noqa: BLE001 - the beat must outlive anything
                if not self._warned:
                    log.warning("liveness: %s cannot beat (%s); retrying", self.id, exc)
                    self._warned = True
            # Sleep until the next beat is due, or a poke brings it forward. A poke comes as a message
            # is received, before Celery files it among the worker's requests: wait POKE_S for that.
            self._poked.wait(max(0.0, self.interval_s - (time.monotonic() - started)))
            if self._poked.is_set():
                self._poked.clear()
                self._stopping.wait(POKE_S)
            if self._stopping.is_set():
                return

    def beat(self, holds: Iterable[Hold] | None, take_orders: bool = True) -> dict[str, dict[str, Any]]:
        """One beat; with `holds` None (unreadable this time) the last ones reported stand.
        Returns the stop orders the supervisor left for this node, if `take_orders` (taken: the
        supervisor gives an order again while the run it names is still reported)."""
        self.seq += 1
        ttl_ms = int(self.ttl_s * 1000)
        alive = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "seq": self.seq,
                            "slots": self.slots, "ops": self.ops})
        stop_key = STOP_KEY.format(node=self.id)
        with self.client.pipeline(transaction=True) as pipe:  # (the orders taken and cleared at once)
            pipe.set(ALIVE_KEY.format(node=self.id), alive, px=ttl_ms)
            if holds is None:
                pipe.expire(HOLDS_KEY.format(node=self.id), HOLDS_TTL_S)
            else:
                pipe.set(HOLDS_KEY.format(node=self.id), json.dumps([h.row() for h in holds]), ex=HOLDS_TTL_S)
            pipe.sadd(NODES_KEY, self.id)
            if take_orders:
                pipe.hgetall(stop_key)
                pipe.delete(stop_key)
            replies = pipe.execute()
        orders = {}
        for task_id, raw in (replies[-2] if take_orders else {}).items():
            try:
                order = json.loads(raw)
            except ValueError:
                continue
            if isinstance(order, dict):
                orders[task_id.decode() if isinstance(task_id, bytes) else str(task_id)] = order
        return orders

    def poke(self) -> None:
        """What the node holds changed (it received a message): report it soon."""
        self._poked.set()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop beating and say so at once (a clean shutdown is not a lost node)."""
        self._stopping.set()
        self._poked.set()
        self.join(timeout_s)
        try:
            self.client.delete(ALIVE_KEY.format(node=self.id), HOLDS_KEY.format(node=self.id))
            self.client.srem(NODES_KEY, self.id)
        except redis.RedisError:
            pass


# Strike delivery tags from a node's holdings (keeping the key's lifetime).
_STRIKE_LUA = """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local strike = {}
for i = 1, #ARGV do strike[ARGV[i]] = true end
local kept = {}
for _, h in ipairs(cjson.decode(raw)) do
  if not strike[h[2]] then kept[#kept + 1] = h end
end
local ttl = redis.call('PTTL', KEYS[1])
local out = #kept > 0 and cjson.encode(kept) or '[]'
if ttl > 0 then redis.call('SET', KEYS[1], out, 'PX', ttl) else redis.call('SET', KEYS[1], out) end
return #kept
"""


def strike(client: redis.Redis, node: str, tags: list[str]) -> None:
    """Forget that lost node `node` held these messages: they were put back on the queue, and keep
    their delivery tags, so another node may hold them now."""
    if tags:
        client.eval(_STRIKE_LUA, 1, HOLDS_KEY.format(node=node), *tags)


def read(client: redis.Redis, prune: bool = False) -> list[Node]:
    """Every node that beat within `HOLDS_TTL_S`, alive or not, in two round trips.

    `prune`: also remove nodes with neither record left from the set of nodes.
    """
    ids = sorted(i.decode() for i in client.smembers(NODES_KEY))
    if not ids:
        return []
    with client.pipeline(transaction=False) as pipe:
        for i in ids:
            pipe.get(ALIVE_KEY.format(node=i))
            pipe.pttl(HOLDS_KEY.format(node=i))
            pipe.get(HOLDS_KEY.format(node=i))
        replies = pipe.execute()
    nodes, gone = [], []
    for n, i in enumerate(ids):
        alive_raw, pttl_ms, holds_raw = replies[3 * n: 3 * n + 3]
        if alive_raw is None and holds_raw is None:
            gone.append(i)  # stopped, or lost long ago
            continue
        alive = json.loads(alive_raw) if alive_raw else {}
        holds = tuple(Hold.from_row(row) for row in json.loads(holds_raw)) if holds_raw else ()
        hostname, _, pid = i.rpartition("[")
        node_ops = alive.get("ops")
        nodes.append(Node(
            id=i, hostname=hostname, pid=int(pid.rstrip("]") or 0), seq=int(alive.get("seq", -1)),
            alive=alive_raw is not None, holds=holds,
            age_s=None if pttl_ms is None or pttl_ms < 0 else max(0.0, HOLDS_TTL_S - pttl_ms / 1000),
            slots=max(1, int(alive.get("slots") or 1)),
            ops={str(k): str(v) for k, v in node_ops.items()} if isinstance(node_ops, dict) else {},
        ))
    if prune and gone:
        client.srem(NODES_KEY, *gone)
    return nodes
