"""Fault injection, loaded only into the crash tests' workers (`--include faults`). Never shipped.

- `LUMINAGRID_TEST_STRIP_DELAY_S`: every strip first sleeps this long, so a test can kill it mid-run.
- A strip whose first own row begins with `POISON` SIGKILLs its pool process, on every delivery:
  an input that always kills its worker.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import numpy as np

from luminagrid import canny

POISON = np.array([13, 37, 13, 37, 13, 37, 13, 37], np.uint8)
_original = canny.canny_strip


def _faulty(gray: np.ndarray, halo_top: int, *args: Any, **kwargs: Any) -> canny.StripEdges:
    time.sleep(float(os.environ.get("LUMINAGRID_TEST_STRIP_DELAY_S", "0")))
    if np.array_equal(gray[halo_top, : POISON.size], POISON):
        os.kill(os.getpid(), signal.SIGKILL)
    return _original(gray, halo_top, *args, **kwargs)


canny.canny_strip = _faulty
