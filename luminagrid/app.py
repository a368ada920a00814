"""The Celery application (`celery -A luminagrid worker` finds it as `luminagrid.app`)."""

from __future__ import annotations

import threading

import cv2
import kombu.pools
from celery import Celery
from celery.signals import worker_process_init

from luminagrid import workarounds
from luminagrid.backend import backend_url
from luminagrid.broker import tls_options

workarounds.apply()

app = Celery("luminagrid", include=["luminagrid.tasks"])
app.config_from_object("celeryconfig")


def use_broker(broker_url: str, result_backend: str | None = None) -> None:
    """Point this process's app at another Redis, dropping connections made to the previous one."""
    redis_url = result_backend or broker_url
    if (app.conf.broker_url, app.conf.result_backend) == (broker_url, backend_url(redis_url)):
        return
    app.conf.update(
        broker_url=broker_url,
        result_backend=backend_url(redis_url),
        broker_use_ssl=tls_options(broker_url),
        redis_backend_use_ssl=tls_options(redis_url),
    )
    # Celery caches producer pools (kombu's, keyed by connection) and the result backend; drop
    # them as Celery's own after-fork hook does, so nothing talks to the previous Redis.
    kombu.pools.reset()
    app._after_fork()
    app._backend_cache = None
    app._local = threading.local()


@worker_process_init.connect
def _one_opencv_thread(**_: object) -> None:
    # Celery's pool gives the parallelism; OpenCV's own threads only fight it (FIELD-NOTES §2).
    cv2.setNumThreads(1)
