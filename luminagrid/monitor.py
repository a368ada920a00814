"""What the cluster is doing, from Celery's remote-control (inspect) API."""

from __future__ import annotations

from dataclasses import dataclass

from luminagrid import broker
from luminagrid.app import app
from luminagrid.errors import LuminagridError
from luminagrid.settings import QUEUE
from luminagrid.tasks import run_strip


class NoWorkers(LuminagridError):
    """No worker answered."""


@dataclass(frozen=True)
class WorkerInfo:
    name: str
    host: str
    pool_processes: int
    active_strips: int
    #: tasks this worker has run since it started
    processed: int


def list_workers(timeout_s: float = 2.0) -> list[WorkerInfo]:
    """The workers that answer within `timeout_s`, by name; raise `NoWorkers` if none does."""
    inspect = app.control.inspect(timeout=timeout_s)
    stats = inspect.stats() or {}
    if not stats:
        raise NoWorkers(
            f"no worker answered within {timeout_s:g} s at {broker.redacted(app.conf.broker_url)}; start one "
            f"with `celery -A luminagrid worker` (queue '{QUEUE}') or check LUMINAGRID_BROKER_URL."
        )
    active = inspect.active() or {}
    return [
        WorkerInfo(
            name=name,
            host=name.split("@", 1)[-1],
            pool_processes=int(info.get("pool", {}).get("max-concurrency", 0)),
            active_strips=sum(1 for t in active.get(name, []) if t.get("name") == run_strip.name),
            processed=sum(int(n) for n in info.get("total", {}).values()),
        )
        for name, info in sorted(stats.items())
    ]
