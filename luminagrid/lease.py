"""The supervisor's lease and the fenced writes made under it.

**The lease** (`Lease`) is one Redis key, `settings.LEASE_KEY`, in the result backend's Redis. Its
value is a token `<node>#<epoch>`: the node that holds it and an epoch, a number taken from
`settings.EPOCH_KEY` (INCR) each time the lease is taken, so no two takes ever share a token. It
expires `liveness_ttl_s` after its holder last renewed it (by Redis's clock). `Lease.hold()`
renews the lease if this holder's token is still there, else takes it if nobody holds it (a new
token), else reports that another node holds it.

**Fencing.** A lease alone does not stop a holder that was paused (SIGSTOP, a stalled VM, a
Redis that stopped answering) from acting on a view that went stale while someone else took
over: it wakes up and carries on. So every write the supervisor makes to recover something
(`Fence`) is one Lua script that first checks that the lease still holds *this* token and only
then writes, in the same atomic step; otherwise it writes nothing and raises `LeaseLost`. A
command delayed in a socket buffer and run by Redis later is checked when it runs.

**Two Redis servers.** When the broker (queues, `unacked`) is another Redis than the result
backend, a script on the broker cannot read the lease. The holder then mirrors its token into
the broker's Redis under the same key name, with the same lifetime, on every take and renewal,
and broker-side writes are fenced against the mirror. A mirror never goes back to a lower
epoch while it exists, and the holder checks the real lease again after writing it, so a mirror
write that was delayed cannot revive a lost lease.

Use: `Fence.call(body, keys, args)` runs any Lua `body` fenced (it sees `K` and `A`: its own
keys and arguments), on the result backend's Redis or, with `broker=True`, the broker's;
`restore`, `drop`, `delete`, `publish`, `set_chord_size` and `results()` (this thread's Celery
result writes fenced) are built on it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import redis
from kombu.utils.json import dumps, loads

from luminagrid import backend, queues
from luminagrid.settings import EPOCH_KEY, LEASE_KEY

log = logging.getLogger(__name__)

#: What a fenced script answers when the lease is not (or no longer) held under its token.
LEASE_LOST_REPLY = "LUMINAGRID_LEASE_LOST"


class LeaseLost(Exception):
    """Another worker supervises now (or this one took the lease again): stop acting on this beat's view."""


# KEYS: lease, epoch counter. ARGV: our token ('' if none), our node, lifetime in ms.
# {1, token}: renewed; {2, token}: taken under a new epoch; {0, holder}: another node holds it.
# A lease in our node's name under a token we do not know was taken by a call of ours whose reply
# never came (a timeout while Redis was paused): nothing was ever done under it; take it afresh.
_HOLD_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur and cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {1, cur}
end
local mine = ARGV[2] .. '#'
if cur and string.sub(cur, 1, #mine) ~= mine then return {0, cur} end
local token = mine .. redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token, 'PX', ARGV[3])
return {2, token}
"""
# The mirror in the broker's Redis. KEYS: mirror. ARGV: token, its epoch, lifetime in ms.
_MIRROR_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then
  local epoch = tonumber(string.match(cur, '#(%d+)$'))
  if epoch and epoch > tonumber(ARGV[2]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
"""
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# Prepended to every fenced body: KEYS[1] is the lease (or its mirror), ARGV[1] the token; the body
# sees its own keys and arguments as K and A.
_FENCE_PRELUDE = f"""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('{LEASE_LOST_REPLY}') end
local K, A = {{}}, {{}}
for i = 2, #KEYS do K[i - 1] = KEYS[i] end
for i = 2, #ARGV do A[i - 1] = ARGV[i] end
"""
# K: unacked, unacked_index, target lists... A: tag, the entry as read, the message to push, '1' to LPUSH.
_RESTORE_LUA = """
local now = redis.call('HGET', K[1], A[1])
if not now then redis.call('ZREM', K[2], A[1]) return 0 end
if now ~= A[2] then return 0 end
redis.call('ZREM', K[2], A[1])
redis.call('HDEL', K[1], A[1])
for i = 3, #K do
  if A[4] == '1' then redis.call('LPUSH', K[i], A[3]) else redis.call('RPUSH', K[i], A[3]) end
end
return 1
"""
_DROP_LUA = """
redis.call('ZREM', K[2], A[1])
return redis.call('HDEL', K[1], A[1])
"""
_DELETE_LUA = "return #K > 0 and redis.call('DEL', unpack(K)) or 0"
_LPUSH_LUA = "return redis.call('LPUSH', K[1], A[1])"
# K: hashes. A: seconds to expire, then a field and a value per hash.
_HSET_LUA = """
for i = 1, #K do
  redis.call('HSET', K[i], A[2 * i], A[2 * i + 1])
  redis.call('EXPIRE', K[i], A[1])
end
return #K
"""
# K: result key [, progress hash]. A: value, seconds to expire ('0': never) [, field, state].
_STORE_LUA = """
if tonumber(A[2]) > 0 then redis.call('SET', K[1], A[1], 'EX', A[2]) else redis.call('SET', K[1], A[1]) end
if K[2] then
  redis.call('HSET', K[2], A[3], A[4])
  if tonumber(A[2]) > 0 then redis.call('EXPIRE', K[2], A[2]) end
end
return 1
"""
# K: chord counter, chord size. A: size, seconds to expire ('0': never).
_CHORD_SIZE_LUA = """
redis.call('DEL', K[1])
if tonumber(A[2]) > 0 then redis.call('SET', K[2], A[1], 'EX', A[2]) else redis.call('SET', K[2], A[1]) end
return 1
"""


def epoch_of(token: str | bytes | None) -> int | None:
    """The epoch of a lease token `<node>#<epoch>`, or None."""
    if isinstance(token, bytes):
        token = token.decode(errors="replace")
    _, sep, epoch = (token or "").rpartition("#")
    return int(epoch) if sep and epoch.isdigit() else None


class Lease:
    """The supervisor's lease, as seen by one node (see the module's docstring).

    `db`: the result backend's Redis (where the lease lives); `mq`: the broker's, which gets a
    mirror of the token when `mirrored` (the two are different servers)."""

    def __init__(self, db: redis.Redis, mq: redis.Redis, node: str, ttl_s: float, mirrored: bool) -> None:
        self.db, self.mq, self.node, self.ttl_ms, self.mirrored = db, mq, node, int(ttl_s * 1000), mirrored
        #: this node's token while it holds the lease (as far as it knows), else None
        self.token: str | None = None
        #: whether the last take was a take back: the lease lapsed under this node (no other node
        #: was seen holding it since), so its own renewals, or Redis, were held up
        self.retaken = False
        self._lapsed: str | None = None
        self._hold = db.register_script(_HOLD_LUA)
        self._mirror = mq.register_script(_MIRROR_LUA)
        self._release_db = db.register_script(_RELEASE_LUA)
        self._release_mq = mq.register_script(_RELEASE_LUA)

    @property
    def epoch(self) -> int | None:
        return epoch_of(self.token)

    @property
    def held(self) -> bool:
        return self.token is not None

    def hold(self) -> int:
        """Renew the lease (1), or take it under a new epoch (2), or find another node holds it (0).

        A connection error leaves the token as it was (the lease may still be ours) and propagates."""
        got, token = self._hold(keys=[LEASE_KEY, EPOCH_KEY], args=[self.token or "", self.node, self.ttl_ms])
        token = token.decode() if isinstance(token, bytes) else str(token)
        if int(got) == 0:
            self.token = self._lapsed = None
            return 0
        if int(got) == 2:
            self.retaken = bool(self.token or self._lapsed)
            self._lapsed = None
        self.token = token
        if self.mirrored and not self._mirror_token(token):
            self.token = None
            return 0
        return int(got)

    def _mirror_token(self, token: str) -> bool:
        if not int(self._mirror(keys=[LEASE_KEY], args=[token, epoch_of(token) or 0, self.ttl_ms])):
            log.warning("lease: the broker's mirror of the lease names a later epoch than %s; not supervising",
                        token)
            return False
        if self.db.get(LEASE_KEY) != token.encode():  # lost while mirroring: undo the mirror
            self._release_mq(keys=[LEASE_KEY], args=[token])
            return False
        return True

    def lost(self) -> None:
        """A fenced write was refused: the lease is not ours any more."""
        self._lapsed, self.token = self.token, None

    def release(self) -> None:
        """Give the lease up at once (a clean shutdown), if still held."""
        token, self.token = self.token, None
        if token:
            self._release_db(keys=[LEASE_KEY], args=[token])
            if self.mirrored:
                self._release_mq(keys=[LEASE_KEY], args=[token])


class Fence:
    """Writes that take effect only while `lease` is held under the token it has now.

    Every method raises `LeaseLost` (and writes nothing) if the lease is not held under that
    token when Redis runs the write; connection errors propagate as redis-py's (or kombu's)."""

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self._scripts: dict[tuple[int, str], Any] = {}
        self._connection: Any = None
        self._channel: Any = None
        self._producer: Any = None

    # --- the one primitive ----------------------------------------------------------------------

    def call(self, body: str, keys: Sequence[str] = (), args: Sequence[Any] = (),
             broker: bool = False) -> Any:
        """Run the Lua `body` atomically with the lease check, on the result backend's Redis (or
        the broker's, `broker=True`). `body` sees its keys and arguments as `K` and `A` (KEYS and
        ARGV without the fence's own) and returns what the call returns."""
        token = self.lease.token
        if token is None:
            raise LeaseLost("this node does not hold the lease")
        client = self.lease.mq if broker else self.lease.db
        script = self._scripts.get((id(client), body))
        if script is None:
            script = self._scripts[(id(client), body)] = client.register_script(_FENCE_PRELUDE + body)
        try:
            return script(keys=[LEASE_KEY, *keys], args=[token, *args])
        except redis.ResponseError as exc:
            if LEASE_LOST_REPLY in str(exc):
                self.lease.lost()
                raise LeaseLost(f"the lease is no longer held under {token}") from None
            raise

    # --- the broker -------------------------------------------------------------------------------

    def restore(self, tag: str, leftmost: bool = False) -> bool:
        """Put the unacknowledged message `tag` back on its queue as kombu's `QoS.restore_by_tag`
        does (marked redelivered, to the list of its priority, with RPUSH: the end workers take
        from, unless `leftmost`), provided its entry in `unacked` is still the one read here.
        False if it was acknowledged or changed meanwhile."""
        indices = [queues.UNACKED, queues.UNACKED_INDEX]
        raw = self.lease.mq.hget(queues.UNACKED, tag)
        if raw is None:  # acknowledged meanwhile: as kombu, still clear its index entry
            return bool(self.call(_RESTORE_LUA, indices, [tag, "", "", ""], broker=True))
        payload, exchange, routing_key = loads(raw.decode() if isinstance(raw, bytes) else raw)
        try:
            payload["headers"]["redelivered"] = True
            payload["properties"]["delivery_info"]["redelivered"] = True
        except (KeyError, TypeError):
            pass
        try:
            channel = self._kombu_channel()
            priority = channel._get_message_priority(payload, reverse=False)
            targets = [channel._q_for_pri(q, priority) for q in channel._lookup(exchange, routing_key)]
        except Exception:
            self.close()  # a broken connection: make a new one next time
            raise
        return bool(self.call(_RESTORE_LUA, [*indices, *targets], [tag, raw, dumps(payload), "1" if leftmost else "0"],
                              broker=True))

    def drop(self, tag: str) -> bool:
        """Forget the unacknowledged message `tag` (its task finished; its acknowledgement was lost)."""
        return bool(self.call(_DROP_LUA, [queues.UNACKED, queues.UNACKED_INDEX], [tag], broker=True))

    def publish(self, signature: Any, **options: Any) -> Any:
        """`signature.apply_async(...)` whose message reaches its queue only if the lease holds:
        published through a producer whose channel's `_put` is a fenced LPUSH. Not retried (a
        retry would revive the producer on a new, unfenced channel): a connection error propagates."""
        producer = self._kombu_producer()
        try:
            return signature.apply_async(producer=producer, retry=False, **options)
        except Exception:
            self.close()  # a broken connection: make a new one next time
            raise

    def _fenced_put(self, queue: str, message: dict[str, Any], **_: Any) -> None:
        # kombu's `Channel._put` for the Redis transport, fenced (queues with an expiry, which
        # luminagrid does not declare, are not refreshed; batches are sent one by one).
        channel = self._channel
        key = channel._q_for_pri(queue, channel._get_message_priority(message, reverse=False))
        self.call(_LPUSH_LUA, [key], [dumps(message)], broker=True)

    def _kombu_channel(self) -> Any:
        if self._channel is None:
            from luminagrid.app import app  # noqa: PLC0415 - the app imports the worker, which imports this

            self._connection = app.connection_for_write()
            self._channel = self._connection.channel()
            self._channel._put = self._fenced_put
        return self._channel

    def _kombu_producer(self) -> Any:
        channel = self._kombu_channel()
        if self._producer is None:
            from luminagrid.app import app  # noqa: PLC0415

            self._producer = app.amqp.Producer(channel)
        assert self._producer.channel is channel and channel._put == self._fenced_put
        return self._producer

    def close(self) -> None:
        connection, self._connection, self._channel, self._producer = self._connection, None, None, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.release()

    # --- the result backend -----------------------------------------------------------------------

    def delete(self, *keys: str, broker: bool = False) -> int:
        """DEL `keys` from the result backend's Redis (or the broker's)."""
        return int(self.call(_DELETE_LUA, list(keys), broker=broker))

    def hset(self, fields: Sequence[tuple[str, str, str]], ttl_s: int) -> None:
        """HSET each (key, field, value), each key then expiring after `ttl_s`."""
        if fields:
            self.call(_HSET_LUA, [k for k, _, _ in fields], [ttl_s, *(x for _, f, v in fields for x in (f, v))])

    def set_chord_size(self, group_id: str, size: int) -> None:
        """Celery's `RedisBackend.set_chord_size`, fenced (it resets the chord's counter)."""
        from luminagrid.app import app  # noqa: PLC0415

        b = app.backend
        self.call(_CHORD_SIZE_LUA, [b.get_key_for_group(group_id, ".c"), b.get_key_for_group(group_id, ".s")],
                  [size, int(b.chord_expires or 0)])

    def store(self, key: str, value: Any, expires: int | None, progress: tuple[str, str, str] | None) -> None:
        """A result write (`backend.PollingRedisBackend._store`), fenced."""
        keys, args = [key], [value, int(expires or 0)]
        if progress is not None:
            keys.append(progress[0])
            args += [progress[1], progress[2]]
        self.call(_STORE_LUA, keys, args)

    @contextlib.contextmanager
    def results(self) -> Iterator[None]:
        """Within this block, this thread's Celery result writes (`app.backend.mark_as_failure`,
        `store_result`, `set`) are fenced: they raise `LeaseLost` and write nothing once the lease is lost."""
        reset = backend.STORE_HOOK.set(self.store)
        try:
            yield
        finally:
            backend.STORE_HOOK.reset(reset)
