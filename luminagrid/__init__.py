"""luminagrid: exact, distributed image processing on Celery and Redis."""

import os as _os

from luminagrid.errors import ConfigError as _ConfigError
from luminagrid.settings import Settings as _Settings

# OpenCV reads its decode limit once, when cv2 is first imported: refuse images whose header
# declares more pixels than ours before a byte of them is decoded (decompression bombs).
try:
    _os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(_Settings.from_env().max_pixels))
except _ConfigError:
    pass  # reported properly where settings are read

from luminagrid.app import app  # noqa: E402
from luminagrid.errors import LuminagridError  # noqa: E402
from luminagrid.jobs import Job, JobResult, submit  # noqa: E402

__all__ = ["Job", "JobResult", "LuminagridError", "app", "submit"]
