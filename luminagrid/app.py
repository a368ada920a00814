"""The Celery application (`celery -A luminagrid worker` finds it as `luminagrid.app`)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import cv2
import kombu.pools
from celery import Celery
from celery.signals import task_received, worker_process_init, worker_ready, worker_shutdown

from luminagrid import workarounds
from luminagrid.backend import backend_url
from luminagrid.broker import SENTINEL_OPTIONS, is_sentinel, sentinel_login, sentinel_options, tls_options
from luminagrid.errors import ConfigError
from luminagrid.settings import Settings


def _check_settings() -> None:
    """A bad LUMINAGRID_* value: under the `celery` command (worker, flower), one line on stderr and
    exit code 1, instead of the traceback Celery prints for an app that fails to load. Elsewhere
    (`cli.py`, a Python program) the `ConfigError` is raised, for the caller to report."""
    try:
        Settings.from_env()
    except ConfigError as exc:
        main = getattr(sys.modules.get("__main__"), "__spec__", None)
        if Path(sys.argv[0]).name != "celery" and not (main and main.name.startswith("celery")):
            raise
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


_check_settings()
workarounds.apply()

app = Celery("luminagrid", include=["luminagrid.tasks"])
app.config_from_object("celeryconfig")
# Remote control (ping, inspect) in JSON, as events: a worker's `stats` reply carries the broker's
# transport options, whose TCP socket options are keyed by integers, which msgpack refuses as map
# keys (`cli.py workers` failed with "int is not allowed for map key").
app.control.mailbox.serializer = "json"


def use_broker(broker_url: str, result_backend: str | None = None, master: str | None = None,
               sentinel_password: str | None = None) -> None:
    """Point this process's app at another Redis, dropping connections made to the previous one.

    `master` (and `sentinel_password`) go with `sentinel://` URLs: the name the sentinels monitor
    the master under; default LUMINAGRID_SENTINEL_MASTER (`ConfigError` if neither names one)."""
    redis_url = result_backend or broker_url
    if is_sentinel(broker_url) or is_sentinel(redis_url):
        master, sentinel_password = sentinel_login(master, sentinel_password)

    def with_sentinel(options: dict[str, Any] | None, url: str, setting: str) -> dict[str, Any]:
        """`options` without the previous URL's sentinel options, with `url`'s."""
        kept = {k: v for k, v in (options or {}).items() if k not in SENTINEL_OPTIONS}
        return kept | sentinel_options(url, master, sentinel_password, setting)

    transport = with_sentinel(app.conf.broker_transport_options, broker_url, "LUMINAGRID_BROKER_URL")
    results = with_sentinel(app.conf.result_backend_transport_options, redis_url, "LUMINAGRID_RESULT_BACKEND")
    wanted = (broker_url, backend_url(redis_url), transport, results)
    if (app.conf.broker_url, app.conf.result_backend, app.conf.broker_transport_options,
            app.conf.result_backend_transport_options) == wanted:
        return
    app.conf.update(
        broker_url=broker_url,
        result_backend=backend_url(redis_url),
        broker_use_ssl=tls_options(broker_url),
        redis_backend_use_ssl=tls_options(redis_url),
        broker_transport_options=transport,
        result_backend_transport_options=results,
    )
    reset_connections()
    app._backend_cache = None
    app._local = threading.local()


def reset_connections() -> None:
    """Drop this process's broker connections (e.g. ones a Redis restart broke, or to a previous
    Redis): Celery caches producer pools (kombu's, keyed by connection) and a connection pool;
    drop them as Celery's own after-fork hook does. New ones are made on next use."""
    kombu.pools.reset()
    app._after_fork()


@worker_process_init.connect
def _one_opencv_thread(**_: object) -> None:
    # Celery's pool gives the parallelism; OpenCV's own threads only fight it (FIELD-NOTES §2).
    cv2.setNumThreads(1)


@worker_ready.connect
def _start_node(sender: object, **_: object) -> None:
    # Imported here: `luminagrid.worker` needs the tasks, which need this app.
    from luminagrid import ops, worker  # noqa: PLC0415

    ops.log_broken()  # installed operations that did not load: in the worker's log, once
    # The sender is the worker's consumer; its controller knows the pool's size (-c).
    slots = getattr(getattr(sender, "controller", None), "concurrency", None)
    worker.start(str(getattr(sender, "hostname", "") or "worker"), slots if isinstance(slots, int) and slots > 0 else 1)


@task_received.connect
def _received(**_: object) -> None:
    from luminagrid import worker  # noqa: PLC0415

    worker.poke()


@worker_shutdown.connect
def _stop_node(**_: object) -> None:
    from luminagrid import worker  # noqa: PLC0415

    worker.stop()
