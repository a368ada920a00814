"""The result backend: Celery's Redis backend, made to poll, to ride through outages, and to count.

- **No pub/sub.** Celery's Redis backend subscribes the sending process to every task's result
  channel and PUBLISHes every result (a second copy of its bytes). luminagrid's client never waits
  that way: `jobs.Job.wait` polls, which also rides through Redis restarts. So this backend neither
  subscribes nor publishes. Consequence: `AsyncResult.get()` on luminagrid's tasks is not
  supported; use `Job.wait()`.
- **Every command retries on connection errors**, for about a minute, with backoff capped at 1 s:
  storing a result, the chord join (made re-entrant in `workarounds`), and luminagrid's own keys
  (records, claims, liveness), which share this client. A Redis restart at any moment then costs
  a pause, not a failed job.
- **Progress**: a strip's final state is written to the job's progress hash in the same
  transaction as its result (`settings.PROGRESS_KEY`), so "how many strips are done" is one HLEN,
  and a crash of Redis can never keep one without the other.
- **The first final result of a strip wins.** A strip can run twice at once under one task id (a
  speculative copy beside a slow or hung original, `speculation.py`). Once one run stored its
  final state, another run's writes under that id (its STARTED, a RETRY, its own result) are
  refused in the same atomic step, so the stored result never changes under the stitch. The
  chord join counts each strip once (Celery's join script keys it by task id and index); a run
  whose final write was refused does not join at all.

`PollingSentinelBackend` is the same for a `sentinel://` URL (Celery's `SentinelBackend` finds the
master through the sentinels, `result_backend_transport_options["master_name"]`, and again after
a failover); `backend_url` picks the one that fits the URL.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from contextvars import ContextVar
from functools import cached_property
from typing import Any

import redis
from celery import states
from celery.backends.redis import RedisBackend, ResultConsumer, SentinelBackend
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from luminagrid import workarounds
from luminagrid.settings import PROGRESS_KEY

#: Retries of one Redis command on a connection error (about a minute at most 1 s apart).
COMMAND_RETRIES = 60
META_PREFIX = "celery-task-meta-"
#: While set (in one thread: `lease.Fence.results`), that thread's result writes go through it
#: instead, as `hook(key, value, expires, progress)`, `progress` (hash, strip index, state) or None.
STORE_HOOK: ContextVar[Callable[[str, Any, int | None, tuple[str, str, str] | None], None] | None] = \
    ContextVar("luminagrid_store_hook", default=None)


def retrying() -> dict[str, Any]:
    """redis-py connection options: retry every command on connection errors and timeouts."""
    return {
        "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), COMMAND_RETRIES),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
    }


def tcp_options() -> dict[str, Any]:
    """TCP keepalive and a user timeout: a connection to a Redis that went silent (a network cut,
    not a closed socket) fails within seconds instead of sitting in retransmission backoff."""
    options = {socket.TCP_KEEPIDLE: 1, socket.TCP_KEEPINTVL: 1, socket.TCP_KEEPCNT: 3}
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        options[socket.TCP_USER_TIMEOUT] = 5000  # ms
    return {"socket_keepalive": True, "socket_keepalive_options": options}


# A strip's result: written unless the strip already has a final state from another run (the
# same write repeated, its reply lost to a connection error, is accepted again). A final state
# goes to the progress hash in the same step. 1: written, 0: refused.
_STRIP_STORE_LUA = """
local meta, progress = KEYS[1], KEYS[2]
local value, expires, index, final, state = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]
if redis.call('HEXISTS', progress, index) == 1 then
  if redis.call('GET', meta) == value then return 1 end
  return 0
end
if expires > 0 then redis.call('SET', meta, value, 'EX', expires) else redis.call('SET', meta, value) end
if final == '1' then
  redis.call('HSET', progress, index, state)
  if expires > 0 then redis.call('EXPIRE', progress, expires) end
end
return 1
"""
#: The task id whose result this thread's last store refused (its chord join is skipped).
_refused = threading.local()


def strip_of(task_id: str) -> tuple[str, int] | None:
    """(job id, strip index) of a strip task id (`<job>.strip<i>`), else None."""
    job, sep, index = task_id.rpartition(".strip")
    return (job, int(index)) if sep and index.isdigit() else None


class _NoSubscriptions(ResultConsumer):
    def consume_from(self, task_id: str) -> None:
        pass

    def cancel_for(self, task_id: str) -> None:
        pass


class PollingRedisBackend(RedisBackend):
    ResultConsumer = _NoSubscriptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connparams.update(retrying())
        if "path" not in self.connparams:  # TCP, not a unix socket
            self.connparams.update(tcp_options())

    def _set_with_state(self, key: str | bytes, value: Any, state: str) -> Any:
        expires = self.failure_expires if state == states.FAILURE else self.expires
        return self.ensure(self._store, (key, value, expires, state))

    def _set(self, key: str | bytes, value: Any, expires: int | None = None) -> None:
        self._store(key, value, expires, None)

    def _store(self, key: str | bytes, value: Any, expires: int | None, state: str | None) -> None:
        """SET the result (no PUBLISH); a strip's final state also goes to its job's progress hash,
        unless another run of the strip stored its final state first (then nothing is written)."""
        expires = self.expires if expires is None else expires
        name = key.decode() if isinstance(key, bytes) else str(key)
        strip = strip_of(name[len(META_PREFIX):]) if name.startswith(META_PREFIX) else None
        hook = STORE_HOOK.get()
        if hook is not None:
            done = (PROGRESS_KEY.format(job=strip[0]), str(strip[1]), str(state)) \
                if strip is not None and state in states.READY_STATES else None
            hook(name, value, expires, done)
            return
        if strip is None:
            self.client.set(key, value, ex=expires or None)
            return
        final = "1" if state in states.READY_STATES else "0"
        stored = self._strip_store_script(keys=[key, PROGRESS_KEY.format(job=strip[0])],
                                          args=[value, int(expires or 0), strip[1], final, state or ""])
        _refused.task_id = None if stored else name[len(META_PREFIX):]

    def on_chord_part_return(self, request: Any, state: str, result: Any, **kwargs: Any) -> Any:
        """Join the chord, unless this run's result was refused (another run of the strip stored
        its own first, and joined, or will)."""
        if getattr(_refused, "task_id", None) == getattr(request, "id", None):
            _refused.task_id = None
            return None
        return super().on_chord_part_return(request, state, result, **kwargs)

    @cached_property
    def _strip_store_script(self) -> Any:
        return self.client.register_script(_STRIP_STORE_LUA)

    @cached_property
    def _chord_part_return_script(self) -> Any:
        return self.client.register_script(workarounds.REENTRANT_CHORD_PART_RETURN_LUA)

    @cached_property
    def _chord_cleanup_script(self) -> Any:
        return self.client.register_script(workarounds.REENTRANT_CHORD_CLEANUP_LUA)


class PollingSentinelBackend(PollingRedisBackend, SentinelBackend):
    """`PollingRedisBackend` on a master found through Redis Sentinel.

    Its method resolution order is this class, `PollingRedisBackend`, `SentinelBackend`,
    `RedisBackend`: polling, retries, progress and the re-entrant chord scripts come from the
    first (so a patch of `PollingRedisBackend`, as the crash tests' fault injection makes, applies
    here too); the URL parsing and the sentinel-managed connection pool from the second. The
    connection options `PollingRedisBackend` adds (retry every command, TCP keepalive) reach the
    master's connections: `SentinelBackend` passes its connection options to `master_for`, and a
    retried command reconnects, which asks the sentinels where the master is now.
    """


def backend_url(redis_url: str) -> str:
    """The `result_backend` setting that selects this backend for a Redis URL.

    Celery reads `<class path>+<url>`; its Redis backend spells unix sockets `socket://`. A
    `sentinel://` URL (parts separated by `;`) selects `PollingSentinelBackend`.
    """
    if redis_url.startswith("sentinel://"):
        return f"luminagrid.backend:PollingSentinelBackend+{redis_url}"
    for scheme in ("redis+socket://", "unix://"):
        if redis_url.startswith(scheme):
            redis_url = "socket://" + redis_url[len(scheme):]
    return f"luminagrid.backend:PollingRedisBackend+{redis_url}"
