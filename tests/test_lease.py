"""The supervisor's lease and its fenced writes, against a real Redis (no workers).

A holder whose lease lapsed and was taken by another (a higher epoch) must change nothing in
Redis with any of its writes, each checked by Redis itself in the same step as the write; its
successor's writes go through. A supervisor that takes the lease back forgets what it knew;
one that renews by time keeps the lease through a beat of slow actions.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import wait_for
from kombu.utils.json import dumps, loads

from luminagrid import backend, broker, queues
from luminagrid.app import app, use_broker
from luminagrid.errors import MessageError
from luminagrid.lease import Fence, Lease, LeaseLost, epoch_of
from luminagrid.local import LocalRedis
from luminagrid.settings import ALIVE_KEY, EPOCH_KEY, EVENTS_KEY, HOLDS_KEY, LEASE_KEY, NODES_KEY, QUEUE, Settings
from luminagrid.supervisor import Supervisor

#: A lease short enough to lapse within a test, long enough to outlast a few round trips.
SHORT_S = 0.4


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    # Short path: unix socket paths are limited to ~107 bytes.
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lg-") as folder:
        r = LocalRedis(Path(folder)).start()
        try:
            yield r
        finally:
            r.stop()


@pytest.fixture
def url(server: LocalRedis) -> str:
    use_broker(server.url)
    client = broker.client(server.url)
    client.flushall()
    return server.url


def lease(url: str, node: str, ttl_s: float = 5.0, db: redis.Redis | None = None) -> Lease:
    client = broker.client(url)
    return Lease(db or client, client, node, ttl_s, mirrored=db is not None)


def snapshot(client: redis.Redis) -> dict[bytes, Any]:
    """Every key's type and content (the lease, which lapses, left out)."""
    out: dict[bytes, Any] = {}
    for key in sorted(client.keys("*")):
        if key == LEASE_KEY.encode():
            continue
        kind = client.type(key).decode()
        out[key] = (kind, {"string": client.get, "hash": client.hgetall, "list": lambda k: client.lrange(k, 0, -1),
                           "set": client.smembers, "zset": lambda k: client.zrange(k, 0, -1)}[kind](key))
    return out


def unacked_entry(client: redis.Redis, task_id: str, priority: int = 3) -> tuple[str, bytes]:
    """A real unacknowledged strip message, as kombu's `QoS.append` records one a worker took:
    published by Celery, taken off its queue list, filed in `unacked` and `unacked_index`."""
    app.send_task("luminagrid.strip", args=(), task_id=task_id, priority=priority, queue=QUEUE)
    name = f"{QUEUE}{queues.PRIORITY_SEP}{priority}"
    raw = wait_for(lambda: client.rpop(name), 10, "the message to be queued")
    message = loads(raw)
    tag = message["properties"]["delivery_tag"]
    client.hset(queues.UNACKED, tag, dumps([message, QUEUE, QUEUE]))
    client.zadd(queues.UNACKED_INDEX, {tag: time.time()})
    return tag, raw


def lapse(client: redis.Redis) -> None:
    wait_for(lambda: not client.exists(LEASE_KEY), 10, "the lease to lapse")


def stitch_signature(job_id: str) -> Any:
    return app.signature("luminagrid.stitch", args=([], {}), task_id=job_id, queue="luminagrid.stitch")


def test_a_holder_whose_lease_lapsed_changes_nothing_and_its_successor_acts(url: str) -> None:
    client = broker.client(url)
    a = lease(url, "a@host[1]", SHORT_S)
    assert a.hold() == 2 and a.epoch == 1
    fence_a = Fence(a)
    tag, _ = unacked_entry(client, "job1.strip0")
    drop_tag, _ = unacked_entry(client, "job1.strip1")
    client.set("luminagrid:out:job1:0", b"pixels")
    stitch_signature("job0").apply_async()  # kombu's declarations (as in a running cluster): not a fenced write
    client.delete("luminagrid.stitch")
    assert fence_a.delete("luminagrid:nothing") == 0  # while held, its writes go through
    lapse(client)
    b = lease(url, "b@host[2]")
    assert b.hold() == 2 and b.epoch == 2 and client.get(LEASE_KEY) == b"b@host[2]#2"
    stale = a.token
    assert stale == "a@host[1]#1"

    before = snapshot(client)
    actions = {
        "restore": lambda: fence_a.restore(tag),
        "drop": lambda: fence_a.drop(drop_tag),
        "delete": lambda: fence_a.delete("luminagrid:out:job1:0"),
        "publish": lambda: fence_a.publish(stitch_signature("job2")),
        "chord size": lambda: fence_a.set_chord_size("group1", 4),
    }

    def fail() -> None:
        with fence_a.results():
            app.backend.mark_as_failure("job1", MessageError("stale"))
    actions["mark_as_failure"] = fail
    for name, action in actions.items():
        a.token = stale  # as if A woke up still believing it holds the lease: Redis must refuse
        with pytest.raises(LeaseLost):
            action()
        assert a.token is None, name  # and A knows it now
        assert snapshot(client) == before, f"A's {name} changed Redis"
    assert a.hold() == 0 and a.token is None  # and cannot take it while B holds it

    fence_b = Fence(b)
    assert fence_b.restore(tag)
    back = client.lrange(f"{QUEUE}{queues.PRIORITY_SEP}3", -1, -1)[0]  # the end workers take from
    assert loads(back)["headers"]["redelivered"] is True and loads(back)["properties"]["correlation_id"] == "job1.strip0"
    assert client.hget(queues.UNACKED, tag) is None and client.zscore(queues.UNACKED_INDEX, tag) is None
    assert not fence_b.restore(tag)  # gone now: nothing to restore
    assert fence_b.drop(drop_tag) and not client.hexists(queues.UNACKED, drop_tag)
    assert fence_b.delete("luminagrid:out:job1:0") == 1
    fence_b.publish(stitch_signature("job2"))
    assert queues.find_queued(client, "luminagrid.stitch", {"job2"}) == {"job2"}
    fence_b.set_chord_size("group1", 4)
    assert client.get(app.backend.get_key_for_group("group1", ".s")) == b"4"
    with fence_b.results():
        app.backend.mark_as_failure("job1", MessageError("lost"))
    assert app.backend.get_task_meta("job1")["status"] == "FAILURE"
    fence_a.close()
    fence_b.close()


def test_outside_a_fenced_block_result_writes_are_plain(url: str) -> None:
    assert backend.STORE_HOOK.get() is None
    app.backend.mark_as_failure("job3", MessageError("plain"))
    assert app.backend.get_task_meta("job3")["status"] == "FAILURE"


def test_the_broker_mirror_fences_broker_writes_when_the_lease_lives_in_another_redis(
    url: str, server: LocalRedis,
) -> None:
    """Broker and result backend in different Redis databases (as if different servers): the
    lease lives in the backend's, its token is mirrored into the broker's."""
    mq = broker.client(url)
    db = redis.Redis(unix_socket_path=str(server.socket_path), db=1)
    a = lease(url, "a@host[1]", SHORT_S, db=db)
    assert a.hold() == 2 and mq.get(LEASE_KEY) == db.get(LEASE_KEY) == b"a@host[1]#1"
    tag, _ = unacked_entry(mq, "job4.strip0")
    lapse(db)
    b = lease(url, "b@host[2]", db=db)
    assert b.hold() == 2 and mq.get(LEASE_KEY) == b"b@host[2]#2"
    stale = a.token
    assert stale is not None
    assert not a._mirror_token(stale)  # a delayed mirror write of A's cannot bring its epoch back
    assert mq.get(LEASE_KEY) == b"b@host[2]#2"
    a.token = stale
    with pytest.raises(LeaseLost):
        Fence(a).drop(tag)
    assert mq.hexists(queues.UNACKED, tag)
    assert Fence(b).drop(tag) and not mq.hexists(queues.UNACKED, tag)
    b.release()
    assert not mq.exists(LEASE_KEY) and not db.exists(LEASE_KEY)


def test_a_lease_taken_by_a_reply_that_never_came_is_taken_afresh(url: str) -> None:
    """Redis paused: a node's take times out at the client but runs when Redis resumes, under a
    token the node never learnt. The node takes it again under a new epoch (nothing was done
    under the unknown one); another node does not."""
    client = broker.client(url)
    client.set(EPOCH_KEY, 7)  # the take that timed out counted it
    client.set(LEASE_KEY, "a@host[1]#7", px=5000)
    assert lease(url, "b@host[2]").hold() == 0
    a = lease(url, "a@host[1]")
    assert a.hold() == 2 and a.token == "a@host[1]#8" and epoch_of(a.token) == 8


def supervisor(url: str, node: str, ttl_s: float = SHORT_S) -> Supervisor:
    return Supervisor(node, Settings(broker_url=url, result_backend=url, liveness_ttl_s=ttl_s))


def test_a_supervisor_that_takes_the_lease_back_forgets_its_state_and_waits_for_beats(url: str) -> None:
    client = broker.client(url)
    s = supervisor(url, "a@host[1]")
    s.tick()
    assert s.leading and s.lease.epoch == 1 and not s.taken_back
    s.stable_since = -float("inf")  # as if it had supervised for a while
    s.alive_before = {"w@host[9]"}
    s.orphans["7"] = object()  # type: ignore[assignment]
    s.walk_due = None
    lapse(client)  # its beats were held up (a Redis outage, a pause): its lease lapsed
    assert s._hold_lease() == 2 and s.lease.epoch == 2
    assert s.taken_back and not s.alive_before and not s.orphans and s.walk_due is not None
    s.tick()
    assert time.monotonic() - s.stable_since < s.settings.liveness_ttl_s + s.beat_s  # not judging yet
    assert s.alive_before == set()  # `_judge` did not run

    lapse(client)
    other = lease(url, "b@host[2]")
    assert other.hold() == 2
    s.orphans["8"] = object()  # type: ignore[assignment]
    s.renewed_at, s.contact_at = -float("inf"), time.monotonic()
    with pytest.raises(LeaseLost, match="another worker holds the lease"):
        s._keep_lease()
    assert not s.leading and not s.orphans  # lost: forgotten too
    other.release()
    assert s._hold_lease() == 2 and not s.taken_back  # it saw another take over: a plain takeover


def test_a_supervisor_whose_beats_had_a_gap_waits_for_workers_to_beat_again(url: str) -> None:
    s = supervisor(url, "a@host[1]", ttl_s=2.0)
    s.tick()
    s.stable_since = -float("inf")
    s.tick()
    assert s.stable_since == -float("inf")  # beats a beat apart: judging
    s.contact_at = time.monotonic() - (s.stale_after_s + 0.5)  # its process was paused, or Redis was
    s.tick()
    assert time.monotonic() - s.stable_since < 1.0
    s.stable_since = -float("inf")
    s.contact_at = time.monotonic() - (s.stale_after_s + 0.5)  # paused mid-beat, between two actions
    with pytest.raises(LeaseLost):
        s._keep_lease()
    assert s.leading and time.monotonic() - s.stable_since < 1.0


def test_renewing_by_time_keeps_the_lease_through_a_beat_of_slow_actions(url: str) -> None:
    """30 actions of 50 ms each (1.5 s, almost 4 lease lifetimes): renewed before each action as
    a beat has passed, the lease holds throughout, under one epoch; without renewing, it lapses
    and the next action is refused."""
    client = broker.client(url)
    s = supervisor(url, "a@host[1]")
    s.tick()
    epoch = s.lease.epoch
    started = time.monotonic()
    for i in range(30):
        s._keep_lease()
        time.sleep(0.05)  # the action's own work
        s.fence.call("return redis.call('SET', K[1], A[1])", ["luminagrid:test:done"], [i])
    assert time.monotonic() - started > 3 * SHORT_S
    assert s.leading and s.lease.epoch == epoch and client.get("luminagrid:test:done") == b"29"
    lapse(client)
    with pytest.raises(LeaseLost):
        s.fence.call("return redis.call('SET', K[1], A[1])", ["luminagrid:test:done"], ["late"])
    assert client.get("luminagrid:test:done") == b"29"


def test_a_leader_that_takes_its_lapsed_lease_back_restores_nothing_of_a_worker_yet_to_beat(url: str) -> None:
    """The case of the issue: after a Redis outage the leader's lease and a live worker's liveness
    record have both expired by Redis's clock; the leader takes its lease back before the worker's
    next beat lands. It must neither declare the worker lost nor put back the message it runs."""
    client = broker.client(url)
    s = supervisor(url, "a@host[1]")
    worker = "w@host[9]"
    tag, _ = unacked_entry(client, "job5.strip0")

    def beat() -> None:
        client.set(ALIVE_KEY.format(node=worker), json.dumps({"seq": 1}), px=60_000)
        client.set(HOLDS_KEY.format(node=worker), json.dumps([["job5.strip0", tag, "running"]]), ex=600)
        client.sadd(NODES_KEY, worker)
    beat()
    s.tick()
    s.stable_since = -float("inf")  # it has supervised for a while
    s.tick()
    assert s.alive_before == {worker}
    client.delete(ALIVE_KEY.format(node=worker))  # expired during the outage
    lapse(client)
    s.contact_at = time.monotonic()  # leave the gap rule out: the take back alone must make it wait
    s.tick()
    assert s.lease.epoch == 2 and s.taken_back
    assert client.hexists(queues.UNACKED, tag), "the live worker's message was put back"
    assert not [e for e in client.lrange(EVENTS_KEY, 0, -1) if b"is lost" in e]
    beat()  # the worker's next beat lands: from now on it is judged as it is, alive
    wait_for(lambda: s.tick() or time.monotonic() - s.stable_since >= s.settings.liveness_ttl_s + s.beat_s,
             10, "the wait for beats to end", poll_s=s.beat_s)
    s.tick()
    assert s.alive_before == {worker} and client.hexists(queues.UNACKED, tag)
