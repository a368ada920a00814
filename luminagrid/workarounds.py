"""Fixes for bugs and unsafe defaults in the libraries underneath, each with how it was found.

Imported by `luminagrid.app`, so every worker and client gets them (`apply()`); the chord-join
scripts are used by `luminagrid.backend`. Celery, kombu and redis are imported only where a fix
needs them: the operations import this module for OpenCV's, and the command line imports the
operations before Celery (to start reading the image sooner).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import cv2


@contextmanager
def opencv_without_ipp() -> Iterator[None]:
    """Run OpenCV's own code instead of Intel IPP's, in this thread (OpenCV keeps the switch per
    thread), for operations whose IPP variant is not local.

    The opencv-python wheels route `cv2.bilateralFilter` to IPP when it is available. IPP's result
    for a pixel then depends on rows beyond the filter's radius: with d=12 (radius 6) on
    `tests.conftest.synthetic(18357560, 52, 54, 3)`, sigma_color 68.014117307389, sigma_space
    65.125, filtering rows 40: gives a different row 48 (pixel 31) than filtering the whole image,
    though 8 rows lie above it; 1 in 300 random cases like it differ. With
    `cv2.ipp.setUseIPP(False)` none of them do (OpenCV 5.0.0, found by
    tests/test_ops.py::test_every_operation_on_strips_equals_the_whole_image_call). So the
    operation is defined as OpenCV's own implementation, on one machine and on every strip alike.
    """
    before = cv2.ipp.useIPP()
    cv2.ipp.setUseIPP(False)
    try:
        yield
    finally:
        cv2.ipp.setUseIPP(before)


def _lost_transport_is_a_connection_error() -> None:
    """Keep a worker alive across Redis restarts (kombu 5.7 with Celery 5.7).

    On a broker connection error, Celery's consumer calls `connection.collect()`, which detaches the
    transport from its client, and then closes the connection; meanwhile finished tasks still
    acknowledge their messages on the old channel. Both need a new Redis client, and building one
    dereferences the detached client: `AttributeError: 'NoneType' object has no attribute 'hostname'`
    in `Channel._connparams`. That is not among the errors kombu and Celery expect there, so the
    worker stops with "Unrecoverable error". Seen after 3-5 Redis restarts in
    tests/test_crash.py::test_jobs_survive_repeated_redis_restarts_with_aof (cf. kombu issue #582).

    Raise what it is, a connection error, and the existing handling applies: the close is
    ignored, the failed ack is logged, and the message stays in Redis's unacked set, where the
    supervisor finds it unheld and restores it, or drops it if its task already finished.
    """
    import redis  # noqa: PLC0415
    from kombu.transport import redis as kombu_redis  # noqa: PLC0415

    channel = kombu_redis.Channel
    original = channel._connparams
    if getattr(original, "_luminagrid_fixed", False):
        return

    def _connparams(self: Any, asynchronous: bool = False) -> dict[str, Any]:
        if getattr(self.connection, "client", None) is None:
            raise redis.ConnectionError("the broker connection of this channel is closed")
        return original(self, asynchronous=asynchronous)

    _connparams._luminagrid_fixed = True  # type: ignore[attr-defined]
    channel._connparams = _connparams


def _reconnect_within_a_second() -> None:
    """Reconnect to the broker every second, not with a backoff that grows to 30 s (kombu 5.7).

    Celery's consumer calls `Connection.ensure_connection(errback, max_retries, callback=...)`
    without intervals, so kombu's defaults apply: 2 s, then 4, 6, ... up to 30 s between
    attempts. Measured: a worker cut off from Redis for 60 s (nftables drop in its network
    namespace) did not serve again within 30 s of the link healing; after a 10 s cut, 18 s.
    A connection attempt is cheap and a lost worker costs the whole cluster its share, so
    try every second (the connect itself is bounded by `broker_connection_timeout`).
    """
    import kombu.connection  # noqa: PLC0415

    connection = kombu.connection.Connection
    original = connection.ensure_connection
    if getattr(original, "_luminagrid_fixed", False):
        return

    def ensure_connection(self: Any, *args: Any, **kwargs: Any) -> Any:
        if len(args) <= 2:  # errback, max_retries: the intervals were not given
            kwargs.setdefault("interval_start", 0)
            kwargs.setdefault("interval_step", 0.5)
            kwargs.setdefault("interval_max", 1)
        return original(self, *args, **kwargs)

    ensure_connection._luminagrid_fixed = True  # type: ignore[attr-defined]
    connection.ensure_connection = ensure_connection


def _consumer_steps_close_without_a_connection() -> None:
    """Restart Celery's gossip step cleanly after a lost broker connection (Celery 5.7, kombu 5.7).

    On a connection error Celery's consumer sets `c.connection = None` (after `collect()`, in
    `Consumer.on_connection_error_after_connected`) and then restarts its bootsteps. The gossip
    step (`celery.worker.consumer.gossip.Gossip`, a `bootsteps.ConsumerStep`) closes its channel
    with `ignore_errors(c.connection, channel.close)`: the close fails (Redis is down), and kombu's
    `_ignore_errors(conn)` evaluates `conn.connection_errors` on that None, so the worker logs
    "Error on restarting Gossip: AttributeError("'NoneType' object has no attribute
    'connection_errors'")" with three chained tracebacks. Gossip is on by default (the compose
    file's workers run with it; `local.LocalWorker` passes `--without-gossip`). Reproduced by
    tests/test_crash.py::test_a_redis_restart_under_busy_workers_leaves_no_traceback_in_their_logs:
    a worker with gossip, Redis stopped or killed while it computes strips, on every restart.

    The other consumer steps pass the consumer itself, which keeps the transport's error
    classes (`c.connection_errors`, `c.channel_errors`) across reconnects: do the same here.
    """
    from celery import bootsteps  # noqa: PLC0415
    from kombu.common import ignore_errors  # noqa: PLC0415

    step = bootsteps.ConsumerStep
    if getattr(step._close, "_luminagrid_fixed", False):
        return

    def _close(self: Any, c: Any, cancel_consumers: bool = True) -> None:
        channels = set()
        for consumer in self.consumers or []:
            if cancel_consumers:
                ignore_errors(c, consumer.cancel)
            if consumer.channel:
                channels.add(consumer.channel)
        for channel in channels:
            ignore_errors(c, channel.close)

    _close._luminagrid_fixed = True  # type: ignore[attr-defined]
    step._close = _close


def _a_lost_ack_is_one_line() -> None:
    """Log an acknowledgement lost with the broker connection as one warning, not a CRITICAL
    traceback (kombu 5.7).

    With acks late, a strip that finishes while Redis restarts cannot acknowledge its message:
    kombu logs "Couldn't ack '<tag>', reason:network:ConnectionError" at CRITICAL with a
    traceback (`Message.ack_log_error`), 1-3 times per restart under busy workers (same test as
    above). Nothing is lost: the message stays in Redis's `unacked` hash and the supervisor
    drops it (its task is done) or restores it. Say that in one line; any other error keeps
    kombu's report.
    """
    import redis  # noqa: PLC0415
    from kombu.message import Message  # noqa: PLC0415

    if getattr(Message.ack_log_error, "_luminagrid_fixed", False):
        return
    lost = (redis.ConnectionError, redis.TimeoutError)
    after = "the message stays unacknowledged in Redis, and the supervisor drops it if its task is done, else restores it"

    # Named as kombu's: Celery's prefork pool recognises these callbacks by name (`_is_ack_callback`).
    def ack_log_error(self: Any, logger: Any, errors: Any, multiple: bool = False) -> None:
        try:
            self.ack(multiple=multiple)
        except BrokenPipeError as exc:
            logger.critical("Couldn't ack %r, reason:%r", self.delivery_tag, exc, exc_info=True)
            raise
        except lost as exc:
            logger.warning("Couldn't ack %r: the broker connection is lost (%s); %s", self.delivery_tag, exc, after)
        except errors as exc:
            logger.critical("Couldn't ack %r, reason:%r", self.delivery_tag, exc, exc_info=True)

    def reject_log_error(self: Any, logger: Any, errors: Any, requeue: bool = False) -> None:
        try:
            self.reject(requeue=requeue)
        except lost as exc:
            logger.warning("Couldn't reject %r: the broker connection is lost (%s); %s", self.delivery_tag, exc, after)
        except errors as exc:
            logger.critical("Couldn't reject %r, reason: %r", self.delivery_tag, exc, exc_info=True)

    for fixed in (ack_log_error, reject_log_error):
        fixed._luminagrid_fixed = True  # type: ignore[attr-defined]
        setattr(Message, fixed.__name__, fixed)


def _results_shown_by_their_summary() -> None:
    """Show a task result in the worker's log and in Flower as its `summary`, not its bytes (Celery 5.7).

    At `--loglevel INFO` Celery logs "Task <name>[<id>] succeeded in <s>s: <result>" with the result
    as `saferepr(result, resultrepr_maxsize)` (`celery.app.trace`), and sends the same string as the
    `result` of the task-succeeded event, which Flower shows. luminagrid's results are bytes (edge
    bit maps, pixels): each such line carried up to 1024 characters of hex per strip and per
    stitch. A subclass of dict with its own `__repr__` does not help: `saferepr` walks every dict.
    So a result that is a dict with a str `summary` field (`tasks.run_strip`, `tasks.stitch`: "job
    5f3a87b2 canny strip 3/9 rows 480-720: 0.04 s, 41 KB out, claim") is shown as that summary,
    both there and where a worker reports a result stored before its pool process was lost
    (`celery.worker.request`). Checked by tests/test_monitoring.py (the worker's INFO log, Flower).
    """
    from celery.app import trace  # noqa: PLC0415
    from celery.worker import request  # noqa: PLC0415

    for module in (trace, request):
        original = module.saferepr
        if getattr(original, "_luminagrid_fixed", False):
            continue

        def saferepr(o: Any, maxlen: int | None = None, *args: Any, _original: Any = original, **kwargs: Any) -> str:
            summary = o.get("summary") if isinstance(o, dict) else None
            if isinstance(summary, str):
                return summary if maxlen is None else summary[:maxlen]
            return _original(o, maxlen, *args, **kwargs)

        saferepr._luminagrid_fixed = True  # type: ignore[attr-defined]
        module.saferepr = saferepr


def _broadcasts_survive_a_redis_restart() -> None:
    """Send a remote-control broadcast again, on a fresh connection, when the pooled one was broken
    by a Redis restart (Celery 5.7, kombu 5.7, Flower 2.2).

    `Control.broadcast` (behind `inspect()`, `ping()`, Flower's /api/workers?refresh=1) takes a
    connection from the app's pool; after Redis restarted, the first broadcast on it fails with
    "Error 32 while writing to socket. Broken pipe" and Flower logs "Inspect method stats failed"
    for each method, its first /api/workers?refresh=1 answering with what it knew before. Reproduced
    by tests/test_compose_stack.py (`docker compose restart redis`, then Flower's refresh). The
    second try, on a connection of its own, reaches the new Redis.
    """
    import redis  # noqa: PLC0415
    from celery.app.control import Control  # noqa: PLC0415
    from kombu.exceptions import OperationalError  # noqa: PLC0415

    original = Control.broadcast
    if getattr(original, "_luminagrid_fixed", False):
        return

    def broadcast(self: Any, command: str, *args: Any, connection: Any = None, **kwargs: Any) -> Any:
        try:
            return original(self, command, *args, connection=connection, **kwargs)
        except (OSError, redis.ConnectionError, OperationalError):
            if connection is not None:  # the caller's own connection: the caller's to mend
                raise
            with self.app.connection_for_write() as fresh:
                return original(self, command, *args, connection=fresh, **kwargs)

    broadcast._luminagrid_fixed = True  # type: ignore[attr-defined]
    Control.broadcast = broadcast


def _sentinel_reconnects_ask_the_sentinels() -> None:
    """Reconnect a Sentinel-managed connection to the master the sentinels name now, not to the
    address it had (redis-py 8.1).

    `SentinelManagedConnection.connect()` asks the sentinels where the master is; but a command that
    fails mid-flight is retried through `Connection.send_packed_command`, which reconnects with
    `connect_check_health(retry_socket_connect=True)`: that retries `_connect()` to the connection's
    last `host`/`port`, the dead master's, for all of the connection's retries. Found by
    tests/test_failover.py (lost writes): a pool process storing a strip's result while the master
    was SIGKILLed kept getting "Connection refused" from the old master's port for 50 s, though the
    sentinels had promoted the replica 2 s after the kill; the job waited for it. Reproduced with a
    primary, a replica and three sentinels (`tests/sentinels.py`): a `master_for` client
    (`socket_timeout=2`, `Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 60)`, retrying on
    connection errors and timeouts) in `BLPOP key 1` when the master is SIGKILLed failed after
    55.9 and 56.7 s with "Error 111 connecting to 127.0.0.1:<the old master's port>"; patched, it
    returned from the new master 4.2 s after the kill.

    Such a reconnect goes through `connect()`, which asks the sentinels on every try.
    """
    from redis.sentinel import SentinelManagedConnection  # noqa: PLC0415

    original = SentinelManagedConnection.connect_check_health
    if getattr(original, "_luminagrid_fixed", False):
        return

    def connect_check_health(self: Any, check_health: bool = True, retry_socket_connect: bool = True) -> Any:
        if self._sock:
            return None
        if retry_socket_connect:  # not from `connect_to`, which `connect()` calls with the sentinels' answer
            return self.connect()
        return original(self, check_health=check_health, retry_socket_connect=retry_socket_connect)

    connect_check_health._luminagrid_fixed = True  # type: ignore[attr-defined]
    SentinelManagedConnection.connect_check_health = connect_check_health


def _stats_hide_the_sentinels_password() -> None:
    """Keep the sentinels' own password out of a worker's `stats` reply (Celery 5.7).

    A worker reports its broker connection in `inspect stats`, which Flower shows on its worker page,
    as `Connection.info()` without the `password` (`celery.worker.consumer.connection.Connection.info`
    pops only that key), but with the transport options, where kombu's Sentinel transport takes the
    sentinels' password (`sentinel_kwargs`, from LUMINAGRID_SENTINEL_PASSWORD): anyone who can read
    Flower would read it. Found reading that method; checked by tests/test_failover.py. Mask it, in
    a copy: the options are the live connection's.
    """
    from celery.worker.consumer.connection import Connection  # noqa: PLC0415

    original = Connection.info
    if getattr(original, "_luminagrid_fixed", False):
        return

    def info(self: Any, c: Any) -> dict[str, Any]:
        out = original(self, c)
        params = out.get("broker")
        options = params.get("transport_options") if isinstance(params, dict) else None
        kwargs = options.get("sentinel_kwargs") if isinstance(options, dict) else None
        if isinstance(kwargs, dict) and kwargs.get("password"):
            params["transport_options"] = {**options, "sentinel_kwargs": {**kwargs, "password": "**"}}
        return out

    info._luminagrid_fixed = True  # type: ignore[attr-defined]
    Connection.info = info


def _patched(script: str, old: str, new: str, what: str) -> str:
    if old not in script:
        raise RuntimeError(
            f"luminagrid.workarounds: Celery's {what} script changed, so the re-entrant join cannot be "
            "applied; install the Celery version pyproject.toml allows (celery>=5.7,<6)."
        )
    return script.replace(old, new)


# The Redis backend's chord join (Celery 5.7) is one Lua script per finished strip. It records the
# strip once (by task id and index) and, when the last strip is in, claims the right to publish the
# stitch with a random token (SET NX). `result_backend_always_retry` covers storing a result but
# not this script: a Redis restart in that instant turned a finished strip into
# `ChordError: Dependency <job>.strip1 raised network:ConnectionError` and failed the job (an 8K job,
# 24 strips, Redis stopped for 1 s while strips stored their results; about 1 run in 6 with 200
# strips). luminagrid's backend therefore retries every Redis command on connection errors
# (`backend.PollingRedisBackend`). A retry can repeat a script whose reply was lost: recording is
# already idempotent, but the claim is not (the token's own earlier SET blocks its NX), so the stitch
# would never be published. These versions accept a claim the same token already holds, and a
# cleanup that already ran. Reproduced by tests/test_supervision.py (phase "join").
def _reentrant_scripts() -> dict[str, str]:
    from celery.backends import redis as celery_redis  # noqa: PLC0415

    return {
        "REENTRANT_CHORD_PART_RETURN_LUA": _patched(
            celery_redis.CHORD_PART_RETURN_LUA,
            "    if redis.call('SET', ckey, claim_token, 'NX', 'EX', claim_expires) then\n        claimed = 1\n    end",
            "    if redis.call('SET', ckey, claim_token, 'NX', 'EX', claim_expires) then\n        claimed = 1\n"
            "    elseif redis.call('GET', ckey) == claim_token then\n        claimed = 1\n    end",
            "chord part return",
        ),
        "REENTRANT_CHORD_CLEANUP_LUA": _patched(
            celery_redis.CHORD_CLEANUP_LUA,
            "    return 1\nend\nreturn 0",
            "    return 1\nend\nif redis.call('GET', ckey) == 'done' then\n    return 1\nend\nreturn 0",
            "chord cleanup",
        ),
    }


def __getattr__(name: str) -> str:
    """`REENTRANT_CHORD_PART_RETURN_LUA` and `REENTRANT_CHORD_CLEANUP_LUA`, made on first use."""
    if name.startswith("REENTRANT_"):
        scripts = _reentrant_scripts()
        globals().update(scripts)
        if name in scripts:
            return scripts[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def apply() -> None:
    _lost_transport_is_a_connection_error()
    _reconnect_within_a_second()
    _consumer_steps_close_without_a_connection()
    _a_lost_ack_is_one_line()
    _results_shown_by_their_summary()
    _broadcasts_survive_a_redis_restart()
    _stats_hide_the_sentinels_password()
    apply_redis()


def apply_redis() -> None:
    """The fixes of redis-py alone (`broker.client` applies them before making a Sentinel client,
    in a process that may not have loaded the Celery app yet)."""
    _sentinel_reconnects_ask_the_sentinels()
