"""What the cluster is doing: Celery's remote-control (inspect) API plus the liveness records."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from luminagrid import broker, liveness, record
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
    #: it answered the inspect broadcast
    online: bool = True
    #: e.g. "beat 0.3 s ago", or "lost: last beat 12 s ago" (from `liveness`)
    liveness: str = "no record"
    #: its liveness record is fresh (None: it has none)
    alive: bool | None = None
    #: seconds since its last beat (None: unknown)
    beat_age_s: float | None = None


def _liveness_text(node: liveness.Node | None) -> str:
    if node is None:
        return "no record"
    age = f"{node.age_s:.1f} s ago" if node.age_s is not None else "unknown"
    return f"beat {age}" if node.alive else f"lost: last beat {age}"


def _beat(node: liveness.Node | None) -> dict[str, Any]:
    """A worker's liveness fields of `WorkerInfo`."""
    if node is None:
        return {"liveness": _liveness_text(None)}
    return {"liveness": _liveness_text(node), "alive": node.alive, "beat_age_s": node.age_s}


def list_workers(timeout_s: float = 2.0) -> list[WorkerInfo]:
    """The workers that answer within `timeout_s`, and recently lost ones, by name; raise
    `NoWorkers` if no worker is alive."""
    inspect = app.control.inspect(timeout=timeout_s)
    stats = inspect.stats() or {}
    nodes = {n.hostname: n for n in sorted(liveness.read(record.fast_client()), key=lambda n: (n.alive, -(n.age_s or 0)))}
    if not stats and not any(n.alive for n in nodes.values()):
        lost = [n for n in nodes.values() if not n.alive]
        also = f" ({len(lost)} lost recently: {', '.join(n.id for n in lost)})" if lost else ""
        raise NoWorkers(
            f"no worker answered within {timeout_s:g} s at {broker.redacted(app.conf.broker_url)}{also}; start one "
            f"with `celery -A luminagrid worker` (queue '{QUEUE}') or check LUMINAGRID_BROKER_URL."
        )
    active = (inspect.active() or {}) if stats else {}
    out = [
        WorkerInfo(
            name=name,
            host=name.split("@", 1)[-1],
            pool_processes=int(info.get("pool", {}).get("max-concurrency", 0)),
            active_strips=sum(1 for t in active.get(name, []) if t.get("name") == run_strip.name),
            processed=sum(int(n) for n in info.get("total", {}).values()),
            **_beat(nodes.get(name)),
        )
        for name, info in sorted(stats.items())
    ]
    for name, node in sorted(nodes.items()):
        if name not in stats:
            out.append(WorkerInfo(
                name=node.id, host=name.split("@", 1)[-1], pool_processes=0,
                active_strips=sum(1 for h in node.holds if h.state == "running" and ".strip" in h.task_id),
                processed=0, online=False, **_beat(node),
            ))
    return out
