"""luminagrid: exact, distributed image processing on Celery and Redis."""

from luminagrid.app import app
from luminagrid.errors import LuminagridError
from luminagrid.jobs import Job, JobResult, submit

__all__ = ["Job", "JobResult", "LuminagridError", "app", "submit"]
