"""All settings in one typed place, read from `LUMINAGRID_*` environment variables.

`celeryconfig.py` maps these onto Celery; nothing else reads the environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum

from luminagrid.errors import ConfigError

DEFAULT_BROKER_URL = "redis://localhost:6379/0"
#: The operation `submit` runs when none is named.
DEFAULT_OP = "canny"
#: Upper bound on jobs in flight in a batch (each holds its strips' payloads in Redis until done).
MAX_JOBS_IN_FLIGHT = 64


class Codec(str, Enum):
    """How strips travel (`codec.py` does the work): jpeg (smaller; exact w.r.t. the JPEG-decoded
    image) or lossless (raw samples + LZ4)."""

    jpeg = "jpeg"
    lossless = "lossless"


#: The strips' queue; stitches have their own, so a job's stitch never waits behind other jobs' strips.
QUEUE = "luminagrid"
STITCH_QUEUE = "luminagrid.stitch"
QUEUES = (QUEUE, STITCH_QUEUE)
#: Lifetime of the lock a worker holds while kombu's own sweep (the last line of defence, after
#: the visibility timeout) puts unacknowledged messages back; a worker killed while holding it
#: stops every other worker's sweep for this long (kombu's default: 300).
UNACKED_MUTEX_EXPIRE_S = 5

# --- Redis keys -------------------------------------------------------------------------------
# Every key luminagrid itself writes starts with KEY_PREFIX and lives in the result backend's
# Redis (Celery's own keys there are `celery-*`); kombu's queues and `unacked*` live in the broker's.
KEY_PREFIX = "luminagrid:"
#: A job's record (JSON): what it computes, where its output goes, its state (`record.py`).
JOB_KEY = KEY_PREFIX + "job:{job}"
#: Present while a job is cancelled: strip tasks check it before decoding (`record.py`).
CANCEL_KEY = KEY_PREFIX + "cancel:{job}"
#: Present while a job's submitter is publishing it, renewed every half second (`publish.py`): its
#: absence tells the supervisor the submitter is gone.
PUBLISHER_KEY = KEY_PREFIX + "publisher:{job}"
#: Hash strip index -> final state (SUCCESS/FAILURE), written with the strip's result (`backend.py`).
PROGRESS_KEY = KEY_PREFIX + "progress:{job}"
#: Sorted set of the jobs the supervisor watches (score: submitted at, unix seconds).
ACTIVE_JOBS_KEY = KEY_PREFIX + "jobs"
#: Sorted set of cancelled jobs whose data the supervisor deletes once no worker holds their tasks.
CANCELLED_JOBS_KEY = KEY_PREFIX + "cancelled"
#: Set of every worker node that ever beat (`liveness.py`).
NODES_KEY = KEY_PREFIX + "nodes"
#: A worker's liveness record: expires `liveness_ttl_s` after its last beat.
ALIVE_KEY = KEY_PREFIX + "alive:{node}"
#: What a worker held at its last beat (kept longer than liveness, to say what a lost worker held).
HOLDS_KEY = KEY_PREFIX + "holds:{node}"
#: The supervisor's lease: which worker supervises now (`supervisor.py`).
LEASE_KEY = KEY_PREFIX + "supervisor"
#: Counts the takes of the lease: each take's epoch, part of its token `<node>#<epoch>` (`lease.py`).
EPOCH_KEY = KEY_PREFIX + "supervisor:epoch"
#: The run id(s) of the Redis the supervisor last watched: a new leader tells a restart from a takeover.
RUN_KEY = KEY_PREFIX + "supervisor:run"
#: A request for the supervisor to look for lost messages (set by clients that saw Redis restart).
WALK_KEY = KEY_PREFIX + "walk"
#: Hash task id -> how often the supervisor recovered it (a task lost too often fails its job).
RECOVERIES_KEY = KEY_PREFIX + "recoveries:{job}"
#: The supervisor's recent recoveries (a capped list of JSON lines), for operators; and per job.
EVENTS_KEY = KEY_PREFIX + "events"
JOB_EVENTS_KEY = KEY_PREFIX + "events:{job}"
#: List of the most recent strips' CPU seconds per megapixel of one operation class (`costs.py`).
COST_KEY = KEY_PREFIX + "cost:{cls}"
#: Hash strip index -> JSON list of the speculative copies the supervisor started (`speculation.py`).
COPIES_KEY = KEY_PREFIX + "copies:{job}"
#: Hash strip index -> JSON list of the nodes on which the strip stopped making progress.
HANGS_KEY = KEY_PREFIX + "hangs:{job}"
#: Hash strip index -> JSON {worker hostname: pool processes the strip was running in when they died}.
KILLS_KEY = KEY_PREFIX + "kills:{job}"
#: Hash task id -> JSON {"pid", "reason"}: pool processes a node is to stop (`warden.py`).
STOP_KEY = KEY_PREFIX + "stop:{node}"


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


def _float(name: str, default: float, minimum: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number; set it to e.g. {default:g}.") from None
    if not value >= minimum:
        raise ConfigError(f"{name}={value:g} is below {minimum:g}; set it to e.g. {default:g}.")
    return value


def _check_sentinel(name: str, url: str, master: str | None) -> None:
    """A Sentinel URL must parse and needs the master's name (`broker.parse_sentinel`)."""
    if not url.startswith("sentinel://"):
        return
    from luminagrid import broker  # noqa: PLC0415 - redis-py, only for Sentinel URLs

    broker.parse_sentinel(url, name)
    if not master:
        raise broker.missing_master(name)


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
    #: The last line of defence: a message taken by a worker and neither acknowledged nor
    #: restored by the supervisor is delivered again after this long. The supervisor restores a
    #: lost worker's messages within seconds (`liveness_ttl_s`), so this only needs to exceed
    #: any strip's run time, which it must: a shorter one runs long strips twice.
    visibility_timeout_s: int = 3600
    #: A worker that has not refreshed its liveness record for this long is lost: the supervisor
    #: puts its unfinished strips back on the queue. It beats 4 times per period.
    liveness_ttl_s: float = 2.0
    #: Deliveries of one strip that each killed its worker process, before the job fails.
    max_deliveries: int = 3
    #: Byte strings (strip payloads and outputs) above this size travel as claim checks (`claims`).
    #: 16 KiB: a 640x480 lossless job took 24.9 ms with 256 KiB (its 250 KB payload base64'd in
    #: the message), 15.8 ms with 16 KiB (measured, medians of 30).
    inline_max_bytes: int = 16 * 1024
    #: The name the sentinels monitor the master under; required with `sentinel://` URLs.
    sentinel_master: str | None = None
    #: The sentinels' own password (`requirepass` in sentinel.conf), if any; the URL's is the master's.
    sentinel_password: str | None = None
    #: A running strip whose pool process used no CPU and moved no bytes for this long is hung: it is run again on
    #: another node at once, and its process stopped once the copy finished (`speculation.py`).
    stall_s: float = 3.0

    @property
    def soft_time_limit_s(self) -> float:
        """A strip running this long is interrupted and retried (a hung worker, not real work)."""
        return self.visibility_timeout_s * 0.5

    @property
    def retry_backoff_max_s(self) -> int:
        """Retry delays stay short, and well under the visibility timeout (or redelivery loops)."""
        return max(1, min(10, self.visibility_timeout_s // 6))

    @property
    def beat_s(self) -> float:
        """How often a worker refreshes its liveness record, and the supervisor looks, in seconds."""
        return self.liveness_ttl_s / 4

    @classmethod
    def from_env(cls) -> Settings:
        broker = os.environ.get("LUMINAGRID_BROKER_URL") or ""
        backend = os.environ.get("LUMINAGRID_RESULT_BACKEND") or ""
        master = os.environ.get("LUMINAGRID_SENTINEL_MASTER") or None
        _check_sentinel("LUMINAGRID_BROKER_URL", broker, master)
        _check_sentinel("LUMINAGRID_RESULT_BACKEND", backend, master)
        return cls(
            broker_url=broker or DEFAULT_BROKER_URL,
            result_backend=backend or broker or DEFAULT_BROKER_URL,
            broker_url_explicit=bool(broker),
            sentinel_master=master,
            sentinel_password=os.environ.get("LUMINAGRID_SENTINEL_PASSWORD") or None,
            max_pixels=_int("LUMINAGRID_MAX_PIXELS", cls.max_pixels, 1),
            result_ttl_s=_int("LUMINAGRID_RESULT_TTL_S", cls.result_ttl_s, 60),
            visibility_timeout_s=_int("LUMINAGRID_VISIBILITY_TIMEOUT_S", cls.visibility_timeout_s, 5),
            liveness_ttl_s=_float("LUMINAGRID_LIVENESS_TTL_S", cls.liveness_ttl_s, 0.4),
            max_deliveries=_int("LUMINAGRID_MAX_DELIVERIES", cls.max_deliveries, 1),
            inline_max_bytes=_int("LUMINAGRID_INLINE_MAX_BYTES", cls.inline_max_bytes, 0),
            stall_s=_float("LUMINAGRID_STALL_S", cls.stall_s, 0.5),
        )
