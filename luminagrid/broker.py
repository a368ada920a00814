"""Talking to Redis directly (redis-py): reachability checks and URL handling.

A URL is a plain Redis (`redis://`, `rediss://`, `redis+socket://`) or a set of Redis Sentinels
(`sentinel://[:PASSWORD@]HOST:PORT[/DB];sentinel://HOST:PORT;...`, with the monitored master's
name in LUMINAGRID_SENTINEL_MASTER). A client for a Sentinel URL asks the sentinels where the
master is whenever it (re)connects, so after a failover it follows the new master.
"""

from __future__ import annotations

import os
import re
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
import redis.sentinel
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.retry import Retry

from luminagrid.errors import BrokerUnreachable, ConfigError

_SOCKET_SCHEMES = ("redis+socket://", "socket://")
SENTINEL_SCHEME = "sentinel://"
#: The port of a sentinel named without one (Redis Sentinel's own default).
SENTINEL_PORT = 26379
#: Transport options (Celery's broker and result backend) that only Sentinel URLs carry.
SENTINEL_OPTIONS = ("master_name", "sentinel_kwargs")
EXAMPLE_SENTINEL_URL = "sentinel://:PASSWORD@10.0.0.1:26379/0;sentinel://10.0.0.2:26379;sentinel://10.0.0.3:26379"


def _default_retry() -> Retry:
    """redis-py's own default for `from_url` clients (a few tries within about a second), spelled
    out so that plain and Sentinel clients retry alike (`master_for` clients default to none)."""
    return Retry(ExponentialWithJitterBackoff(base=0.01, cap=1.0), 10)


def redacted(url: str) -> str:
    """The URL with any password replaced by `***`, safe to print (every part of a Sentinel URL)."""
    return ";".join(re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", part) for part in url.split(";"))


def is_sentinel(url: str) -> bool:
    return url.startswith(SENTINEL_SCHEME)


@dataclass(frozen=True)
class SentinelUrl:
    """A parsed `sentinel://` URL: where the sentinels are, and how to log in to the master.

    The password, user and database are the master's (and its replicas'), given on the first part
    only: that is where Celery and kombu read them."""

    sentinels: tuple[tuple[str, int], ...]
    password: str | None = None
    username: str | None = None
    db: int = 0


def parse_sentinel(url: str, setting: str = "LUMINAGRID_BROKER_URL") -> SentinelUrl:
    """Parse a Sentinel URL, or raise `ConfigError` naming the bad part and the fix."""
    shown = redacted(url)
    fix = f"write it as {EXAMPLE_SENTINEL_URL}"
    sentinels: list[tuple[str, int]] = []
    first: tuple[str | None, str | None, int] = (None, None, 0)
    for n, part in enumerate(url.split(";")):
        if not part.strip():
            continue  # a trailing ';'
        if not part.startswith(SENTINEL_SCHEME):
            raise ConfigError(f"{setting}={shown}: part {redacted(part)!r} is not a sentinel:// URL (every part "
                              f"separated by ';' must be one); {fix}.")
        split = urlsplit(part)
        try:
            host, port = split.hostname, split.port or SENTINEL_PORT
        except ValueError:
            raise ConfigError(f"{setting}={shown}: part {redacted(part)!r} has a bad port; {fix}.") from None
        if not host:
            raise ConfigError(f"{setting}={shown}: part {redacted(part)!r} names no host; {fix}.")
        path = split.path.strip("/")
        if path and not path.isdigit():
            raise ConfigError(f"{setting}={shown}: part {redacted(part)!r} has database {path!r}, not a number; {fix}.")
        login = (unquote(split.username) if split.username else None,
                 unquote(split.password) if split.password is not None else None, int(path or 0))
        if n == 0:
            first = login
        elif login != (None, None, 0) and login != first:
            raise ConfigError(f"{setting}={shown}: part {n + 1} has its own password or database; Celery and kombu "
                              "read them from the first part only: put them there, once; " + fix + ".")
        sentinels.append((host, port))
    if not sentinels:
        raise ConfigError(f"{setting}={shown} names no sentinel; {fix}.")
    username, password, db = first
    return SentinelUrl(tuple(sentinels), password=password, username=username, db=db)


def missing_master(setting: str = "LUMINAGRID_BROKER_URL") -> ConfigError:
    """The error for a Sentinel URL without LUMINAGRID_SENTINEL_MASTER."""
    return ConfigError(
        f"{setting} is a Sentinel URL (sentinel://...) but LUMINAGRID_SENTINEL_MASTER is not set: the sentinels "
        "watch masters by name; set LUMINAGRID_SENTINEL_MASTER to the NAME of their `sentinel monitor NAME HOST "
        "PORT QUORUM` line (e.g. LUMINAGRID_SENTINEL_MASTER=mymaster)."
    )


def sentinel_kwargs(timeout_s: float, password: str | None = None) -> dict[str, Any]:
    """Connection options for the sentinels themselves: short timeouts (a sentinel that hangs must
    not stall discovery; Celery's result backend gives them none by default), and their own
    password, if they have one (LUMINAGRID_SENTINEL_PASSWORD; the URL's password is the master's)."""
    return {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s,
            **({"password": password} if password else {})}


def sentinel_options(url: str, master: str | None, password: str | None = None,
                     setting: str = "LUMINAGRID_BROKER_URL") -> dict[str, Any]:
    """Celery transport options (broker or result backend) for a Sentinel URL; {} for other URLs."""
    if not is_sentinel(url):
        return {}
    parse_sentinel(url, setting)
    if not master:
        raise missing_master(setting)
    return {"master_name": master, "sentinel_kwargs": sentinel_kwargs(2.0, password)}


def tls_options(url: str, ca_certs: str | None = None) -> dict[str, Any] | None:
    """TLS settings for a `rediss://` URL (None for others): certificates are always verified.

    `ca_certs` is a CA bundle (default: LUMINAGRID_REDIS_CA_CERTS, else the system's trust store).
    Celery takes this dict as `broker_use_ssl` and `redis_backend_use_ssl`; without it kombu would
    connect to a `rediss://` URL without checking the certificate.
    """
    if not url.startswith("rediss://"):
        return None
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": ca_certs or os.environ.get("LUMINAGRID_REDIS_CA_CERTS") or None}


def client(url: str, timeout_s: float = 2.0, retry: bool = True, master: str | None = None,
           sentinel_password: str | None = None) -> redis.Redis:
    """A redis-py client for a Celery-style URL (`redis://`, `rediss://`, `redis+socket://`, `sentinel://`).

    With `retry=False` a command fails at the first connection error (for loops that look again
    anyway, such as the supervisor's); otherwise redis-py retries a few times within ~1 s.
    A Sentinel URL gives a client of the master named `master` (default: LUMINAGRID_SENTINEL_MASTER)
    that asks the sentinels again on every new connection: after a failover, the first command
    on an old connection fails (and is retried, unless `retry=False`), the next ones reach the
    new master.
    """
    if is_sentinel(url):
        return _sentinel_client(url, timeout_s, retry, master, sentinel_password)
    for scheme in _SOCKET_SCHEMES:
        if url.startswith(scheme):
            url = "unix://" + url[len(scheme):]
    return redis.Redis.from_url(
        url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
        retry=_default_retry() if retry else Retry(NoBackoff(), 0), **(tls_options(url) or {})
    )


def sentinel_login(master: str | None, sentinel_password: str | None) -> tuple[str | None, str | None]:
    """The master's name and the sentinels' password for a `sentinel://` URL: each as given, or
    if not given (None) as configured (LUMINAGRID_SENTINEL_MASTER, LUMINAGRID_SENTINEL_PASSWORD)."""
    if master is None or sentinel_password is None:
        from luminagrid.settings import Settings  # noqa: PLC0415 - settings imports nothing of this module's users

        settings = Settings.from_env()
        master = settings.sentinel_master if master is None else master
        sentinel_password = settings.sentinel_password if sentinel_password is None else sentinel_password
    return master, sentinel_password


def _sentinel_client(url: str, timeout_s: float, retry: bool, master: str | None,
                     sentinel_password: str | None) -> redis.Redis:
    master, sentinel_password = sentinel_login(master, sentinel_password)
    if not master:
        raise missing_master()
    parsed = parse_sentinel(url)
    from luminagrid import workarounds  # noqa: PLC0415 - only for Sentinel URLs

    workarounds.apply_redis()  # a command retried across a failover must find the new master
    manager = redis.sentinel.Sentinel(
        list(parsed.sentinels), sentinel_kwargs=sentinel_kwargs(min(timeout_s, 2.0), sentinel_password),
        socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
        retry=_default_retry() if retry else Retry(NoBackoff(), 0),
    )
    return manager.master_for(master, password=parsed.password, username=parsed.username, db=parsed.db)


def answers(url: str, timeout_s: float = 0.5, master: str | None = None) -> bool:
    """True if a Redis server answers PING at `url` within about `timeout_s`."""
    try:
        with client(url, timeout_s, master=master) as r:
            return bool(r.ping())
    except (redis.RedisError, OSError, ValueError):
        return False


def require(url: str, timeout_s: float = 3.0, master: str | None = None) -> None:
    """Raise `BrokerUnreachable` naming `url` unless Redis answers there."""
    try:
        with client(url, timeout_s, master=master) as r:
            r.ping()
    except redis.AuthenticationError as exc:
        login = ("sentinel://:PASSWORD@host:port;sentinel://host:port (the master's password; the sentinels' "
                 "own, if any, in LUMINAGRID_SENTINEL_PASSWORD)") if is_sentinel(url) else "redis://:PASSWORD@host:port/db"
        raise BrokerUnreachable(
            f"Redis at {redacted(url)} refused the credentials ({exc}); fix the password in "
            f"LUMINAGRID_BROKER_URL ({login})."
        ) from None
    except redis.sentinel.MasterNotFoundError as exc:
        raise BrokerUnreachable(
            f"the sentinels at {redacted(url)} name no live master ({exc}); check that they run, that they "
            "monitor the master under the name in LUMINAGRID_SENTINEL_MASTER, and that its Redis is up."
        ) from None
    except (redis.RedisError, OSError, ValueError) as exc:
        raise BrokerUnreachable(
            f"no Redis answers at {redacted(url)} ({exc}); start Redis there, fix "
            "LUMINAGRID_BROKER_URL, or unset it to run embedded."
        ) from None
