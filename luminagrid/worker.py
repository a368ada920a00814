"""What a worker node runs beside Celery: its liveness beat and its supervisor, as two threads of
its main process (`liveness.Beat`, `supervisor.Supervisor`).

`luminagrid.app` starts them when the worker is ready and stops them when it shuts down; pool
processes never run them. A clean stop deletes the node's liveness record, so the supervisor
does not take a stopped worker for a lost one (its unacknowledged messages are put back by
kombu as the worker closes its channel).
"""

from __future__ import annotations

import threading

from luminagrid import liveness, supervisor
from luminagrid.broker import client
from luminagrid.settings import Settings

_threads: list[liveness.Beat | supervisor.Supervisor] = []
_lock = threading.Lock()


def start(hostname: str, slots: int = 1) -> None:
    """Start beating and supervising for the worker node `hostname` with `slots` pool processes
    (once per process)."""
    with _lock:
        if _threads:
            return
        settings = Settings.from_env()
        beat = liveness.Beat(client(settings.result_backend, retry=False, master=settings.sentinel_master,
                                    sentinel_password=settings.sentinel_password), hostname, settings.liveness_ttl_s,
                             slots=slots, ops=liveness.node_ops())
        watcher = supervisor.Supervisor(beat.id, settings)
        beat.start()
        watcher.start()
        _threads.extend([beat, watcher])


def poke() -> None:
    """A message was received: let the beat report it soon (`liveness.Beat.poke`)."""
    for thread in _threads:
        if isinstance(thread, liveness.Beat):
            thread.poke()


def stop() -> None:
    with _lock:
        for thread in reversed(_threads):
            thread.stop()
        _threads.clear()
