"""The Celery application (`celery -A luminagrid worker` finds it as `luminagrid.app`)."""

from __future__ import annotations

import cv2
from celery import Celery
from celery.signals import worker_process_init

app = Celery("luminagrid", include=["luminagrid.tasks"])
app.config_from_object("celeryconfig")


def use_broker(broker_url: str, result_backend: str | None = None) -> None:
    """Point this process's app at another Redis. Call before the first job is submitted."""
    app.conf.update(broker_url=broker_url, result_backend=result_backend or broker_url)


@worker_process_init.connect
def _one_opencv_thread(**_: object) -> None:
    # Celery's pool gives the parallelism; OpenCV's own threads only fight it (FIELD-NOTES §2).
    cv2.setNumThreads(1)
