"""luminagrid: exact, distributed image processing on Celery and Redis.

    import luminagrid
    luminagrid.submit("photo.png").wait().image

The package itself is light: `submit`, `Job`, `JobResult` and the Celery `app` are loaded on first
use, so `cli.py --help` and `luminagrid.settings` need neither Celery nor OpenCV.
"""

from __future__ import annotations

import importlib
import os as _os
from typing import Any

from luminagrid.errors import ConfigError as _ConfigError
from luminagrid.errors import LuminagridError
from luminagrid.settings import Settings as _Settings

# OpenCV reads its decode limit once, when cv2 is first imported: refuse images whose header
# declares more pixels than ours before a byte of them is decoded (decompression bombs). Every
# entry point passes here first: `import luminagrid.<module>`, `celery -A luminagrid`, cli.py.
try:
    _max_pixels = _Settings.from_env().max_pixels
except _ConfigError:  # reported properly where settings are read; meanwhile the default limit holds
    _max_pixels = _Settings.max_pixels
_os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(_max_pixels))

_LATER = {"app": "luminagrid.app", "Job": "luminagrid.jobs", "JobResult": "luminagrid.jobs", "submit": "luminagrid.jobs"}

__all__ = ["Job", "JobResult", "LuminagridError", "app", "submit"]


def __getattr__(name: str) -> Any:
    """`luminagrid.app`, `.submit`, `.Job`, `.JobResult`: imported when first asked for
    (`celery -A luminagrid` asks for `app`)."""
    if name in _LATER:
        value = getattr(importlib.import_module(_LATER[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'luminagrid' has no attribute {name!r}")
