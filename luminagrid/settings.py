"""All settings in one typed place, read from `LUMINAGRID_*` environment variables.

`celeryconfig.py` maps these onto Celery; nothing else reads the environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from luminagrid.errors import ConfigError

DEFAULT_BROKER_URL = "redis://localhost:6379/0"
QUEUE = "luminagrid"


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
        )
