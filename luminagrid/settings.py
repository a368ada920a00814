"""All settings in one typed place, read from `LUMINAGRID_*` environment variables.

`celeryconfig.py` maps these onto Celery; nothing else reads the environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from luminagrid.errors import ConfigError

DEFAULT_BROKER_URL = "redis://localhost:6379/0"
QUEUE = "luminagrid"
#: Prefix of every Redis key luminagrid itself writes (Celery's own keys are `celery-*`).
KEY_PREFIX = "luminagrid:"
#: Lifetime of the lock a worker holds while it sweeps unacknowledged messages back onto the queue;
#: a worker killed while holding it delays recovery by at most this long (kombu's default: 300).
UNACKED_MUTEX_EXPIRE_S = 5


def _int(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number; set it to e.g. {default}.") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} is below {minimum}; set it to e.g. {default}.")
    return value


@dataclass(frozen=True)
class Settings:
    """Process-wide settings. Build with `Settings.from_env()`."""

    broker_url: str = DEFAULT_BROKER_URL
    result_backend: str = DEFAULT_BROKER_URL
    #: True when LUMINAGRID_BROKER_URL was set explicitly (then never fall back to embedded mode).
    broker_url_explicit: bool = False
    #: Largest accepted image, in pixels (width x height).
    max_pixels: int = 250_000_000
    #: How long a job's results stay in Redis if nobody collects them, in seconds.
    result_ttl_s: int = 86_400
    #: A strip taken by a worker that then vanished (node lost) is delivered again after this long.
    #: Must exceed any strip's run time, or strips run twice (harmless, but wasted work).
    visibility_timeout_s: int = 60
    #: Deliveries of one strip that each killed its worker process, before the job fails.
    max_deliveries: int = 3
    #: Byte strings (strip payloads and outputs) above this size travel as claim checks (`claims`).
    inline_max_bytes: int = 256 * 1024

    @property
    def soft_time_limit_s(self) -> float:
        """A strip running this long is interrupted and retried (a hung worker, not real work)."""
        return self.visibility_timeout_s * 0.5

    @property
    def retry_backoff_max_s(self) -> int:
        """Retry delays stay well under the visibility timeout, or redelivery would loop."""
        return max(1, self.visibility_timeout_s // 6)

    @classmethod
    def from_env(cls) -> Settings:
        broker = os.environ.get("LUMINAGRID_BROKER_URL") or ""
        backend = os.environ.get("LUMINAGRID_RESULT_BACKEND") or ""
        return cls(
            broker_url=broker or DEFAULT_BROKER_URL,
            result_backend=backend or broker or DEFAULT_BROKER_URL,
            broker_url_explicit=bool(broker),
            max_pixels=_int("LUMINAGRID_MAX_PIXELS", cls.max_pixels, 1),
            result_ttl_s=_int("LUMINAGRID_RESULT_TTL_S", cls.result_ttl_s, 60),
            visibility_timeout_s=_int("LUMINAGRID_VISIBILITY_TIMEOUT_S", cls.visibility_timeout_s, 5),
            max_deliveries=_int("LUMINAGRID_MAX_DELIVERIES", cls.max_deliveries, 1),
            inline_max_bytes=_int("LUMINAGRID_INLINE_MAX_BYTES", cls.inline_max_bytes, 0),
        )
