"""Fixes for bugs in the libraries underneath, each with what it fixes and how it was found.

Imported by `luminagrid.app`, so every worker and client gets them.
"""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport import redis as kombu_redis


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
    ignored, the failed ack is logged, and the message stays in Redis's unacked set, to be
    restored by the visibility-timeout sweep (a duplicate run, which the chord join ignores).
    """
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


def apply() -> None:
    _lost_transport_is_a_connection_error()
