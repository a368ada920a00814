"""Fault injection, loaded only into the crash tests' workers (`--include faults`). Never shipped.

- `LUMINAGRID_TEST_STRIP_DELAY_S`: every strip first sleeps this long, so a test can kill it mid-run.
- A strip whose first own row begins with `POISON` SIGKILLs its pool process, on every delivery:
  an input that always kills its worker.
- `LUMINAGRID_TEST_HOLD_UNACKED_MUTEX=1`: once the worker holds an unacknowledged message, its next
  sweep takes kombu's unacked lock and never lets go (the worker hangs there), as if the worker
  were killed mid-sweep.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import contextlib
from collections.abc import Iterator

import numpy as np
from kombu.transport import redis as kombu_redis

from luminagrid import canny

POISON = np.array([13, 37, 13, 37, 13, 37, 13, 37], np.uint8)
_original = canny.canny_strip


def _faulty(gray: np.ndarray, halo_top: int, *args: Any, **kwargs: Any) -> canny.StripEdges:
    time.sleep(float(os.environ.get("LUMINAGRID_TEST_STRIP_DELAY_S", "0")))
    if np.array_equal(gray[halo_top, : POISON.size], POISON):
        os.kill(os.getpid(), signal.SIGKILL)
    return _original(gray, halo_top, *args, **kwargs)


canny.canny_strip = _faulty


_original_mutex = kombu_redis.Mutex


@contextlib.contextmanager
def _holding_mutex(client: Any, name: str, expire: int) -> Iterator[None]:
    with _original_mutex(client, name, expire):
        if client.hlen("unacked"):
            time.sleep(3600)
        yield


if os.environ.get("LUMINAGRID_TEST_HOLD_UNACKED_MUTEX"):
    kombu_redis.Mutex = _holding_mutex
