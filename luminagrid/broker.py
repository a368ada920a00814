"""Talking to Redis directly (redis-py): reachability checks and URL handling."""

from __future__ import annotations

import os
import re
import ssl
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from luminagrid.errors import BrokerUnreachable

_SOCKET_SCHEMES = ("redis+socket://", "socket://")


def redacted(url: str) -> str:
    """The URL with any password replaced by `***`, safe to print."""
    return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", url)


def tls_options(url: str, ca_certs: str | None = None) -> dict[str, Any] | None:
    """TLS settings for a `rediss://` URL (None for others): certificates are always verified.

    `ca_certs` is a CA bundle (default: LUMINAGRID_REDIS_CA_CERTS, else the system's trust store).
    Celery takes this dict as `broker_use_ssl` and `redis_backend_use_ssl`; without it kombu would
    connect to a `rediss://` URL without checking the certificate.
    """
    if not url.startswith("rediss://"):
        return None
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": ca_certs or os.environ.get("LUMINAGRID_REDIS_CA_CERTS") or None}


def client(url: str, timeout_s: float = 2.0, retry: bool = True) -> redis.Redis:
    """A redis-py client for a Celery-style URL (`redis://`, `rediss://`, `redis+socket://`).

    With `retry=False` a command fails at the first connection error (for loops that look again
    anyway, such as the supervisor's); otherwise redis-py retries a few times within ~1 s.
    """
    for scheme in _SOCKET_SCHEMES:
        if url.startswith(scheme):
            url = "unix://" + url[len(scheme):]
    extra: dict[str, Any] = {} if retry else {"retry": Retry(NoBackoff(), 0)}
    return redis.Redis.from_url(
        url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s, **extra, **(tls_options(url) or {})
    )


def answers(url: str, timeout_s: float = 0.5) -> bool:
    """True if a Redis server answers PING at `url` within about `timeout_s`."""
    try:
        with client(url, timeout_s) as r:
            return bool(r.ping())
    except (redis.RedisError, OSError, ValueError):
        return False


def require(url: str, timeout_s: float = 3.0) -> None:
    """Raise `BrokerUnreachable` naming `url` unless Redis answers there."""
    try:
        with client(url, timeout_s) as r:
            r.ping()
    except redis.AuthenticationError as exc:
        raise BrokerUnreachable(
            f"Redis at {redacted(url)} refused the credentials ({exc}); fix the password in "
            "LUMINAGRID_BROKER_URL (redis://:PASSWORD@host:port/db)."
        ) from None
    except (redis.RedisError, OSError, ValueError) as exc:
        raise BrokerUnreachable(
            f"no Redis answers at {redacted(url)} ({exc}); start Redis there, fix "
            "LUMINAGRID_BROKER_URL, or unset it to run embedded."
        ) from None
