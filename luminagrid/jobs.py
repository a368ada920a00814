"""The client API: submit an image as a chord of strip tasks and wait for the stitched result.

    job = luminagrid.submit("photo.png", low=100, high=200)
    result = job.wait(timeout_s=60)
    result.edges  # (H, W) uint8, 0 or 255
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from celery import chord
from celery.result import AsyncResult

from luminagrid import canny, codec, images, strips
from luminagrid.app import app
from luminagrid.codec import Codec
from luminagrid.errors import InputError, JobFailed, JobTimeout
from luminagrid.settings import Settings
from luminagrid.tasks import canny_strip, stitch

#: How often `Job.wait` looks at Redis, in seconds (Celery's default of 0.5 s adds ~0.5 s a job).
POLL_S = 0.01


@dataclass(frozen=True)
class Params:
    """What to compute and how to ship it. `validate()` raises `InputError` naming the bad value."""

    low: float = 100.0
    high: float = 200.0
    strips: int | None = None
    codec: Codec = Codec.jpeg
    quality: int = 95

    def validate(self) -> None:
        for name, value in (("low", self.low), ("high", self.high)):
            if not (math.isfinite(value) and 0 <= value <= canny.MAX_THRESHOLD):
                raise InputError(
                    f"--{name} {value:g} is out of range; use a value from 0 to {canny.MAX_THRESHOLD:g}."
                )
        if self.low > self.high:
            raise InputError(f"--low {self.low:g} is above --high {self.high:g}; make low <= high.")
        if self.strips is not None and not (1 <= self.strips <= strips.MAX_STRIPS):
            raise InputError(f"--strips {self.strips} is out of range; use 1 to {strips.MAX_STRIPS}.")
        if not (1 <= self.quality <= 100):
            raise InputError(f"--quality {self.quality} is out of range; use 1 to 100.")


@dataclass
class JobResult:
    """A finished job: `edges` is (H, W) uint8 with 0 and 255."""

    job_id: str
    edges: np.ndarray
    #: worker name -> strips it computed
    workers: dict[str, int]
    stitched_by: str
    wall_s: float


@dataclass
class Job:
    """A submitted job. `wait()` returns its result; `progress()` counts finished strips."""

    id: str
    width: int
    height: int
    strip_count: int
    params: Params
    submitted_at: float = field(default_factory=time.perf_counter)
    _done: set[int] = field(default_factory=set)

    def strip_task_id(self, index: int) -> str:
        return f"{self.id}.strip{index}"

    def progress(self) -> int:
        """How many strips have finished (one Redis MGET for those not yet seen finished)."""
        todo = [i for i in range(self.strip_count) if i not in self._done]
        if todo:
            backend = app.backend
            keys = [backend.get_key_for_task(self.strip_task_id(i)) for i in todo]
            for i, raw in zip(todo, backend.mget(keys)):
                if raw is not None and backend.decode_result(raw)["status"] == "SUCCESS":
                    self._done.add(i)
        return len(self._done)

    def wait(self, timeout_s: float = 600.0, on_progress: Callable[[int, int], None] | None = None) -> JobResult:
        """Block until the stitched result is in, or raise `JobFailed` / `JobTimeout`."""
        final = AsyncResult(self.id, app=app)
        deadline = time.monotonic() + timeout_s
        shown = -1
        while True:
            state = final.state
            if on_progress is not None:
                done = self.strip_count if state == "SUCCESS" else self.progress()
                if done != shown:
                    on_progress(done, self.strip_count)
                    shown = done
            if state == "SUCCESS":
                return self._collect(final.result)
            if state == "FAILURE":
                raise JobFailed(f"job {self.id} failed: {final.result}")
            if time.monotonic() > deadline:
                raise JobTimeout(
                    f"job {self.id} did not finish within {timeout_s:g} s "
                    f"({self.progress()}/{self.strip_count} strips done); are workers running? "
                    "Raise --timeout for larger images."
                )
            time.sleep(POLL_S)

    def _collect(self, meta: dict[str, Any]) -> JobResult:
        edges = codec.unpack_bits(meta["edges"], self.height, self.width).view(np.uint8) * np.uint8(255)
        self.forget()
        return JobResult(
            job_id=self.id,
            edges=edges,
            workers=dict(meta["workers"]),
            stitched_by=str(meta["stitched_by"]),
            wall_s=time.perf_counter() - self.submitted_at,
        )

    def forget(self) -> None:
        """Delete this job's results from Redis (they would otherwise expire after a day)."""
        for task_id in [self.id, *(self.strip_task_id(i) for i in range(self.strip_count))]:
            AsyncResult(task_id, app=app).forget()


def load_gray(image: np.ndarray | str | Path, settings: Settings) -> np.ndarray:
    """The (H, W) uint8 gray image a job computes on, from a path or an array."""
    if isinstance(image, (str, Path)):
        return images.to_gray8(images.read_image(Path(image), settings.max_pixels))
    images.check_pixels(image, settings.max_pixels, "the image")
    return images.to_gray8(image)


def submit(
    image: np.ndarray | str | Path,
    *,
    low: float = 100.0,
    high: float = 200.0,
    strips: int | None = None,
    codec: Codec | str = Codec.jpeg,
    quality: int = 95,
    settings: Settings | None = None,
) -> Job:
    """Cut `image` (a path, or an (H, W[, C]) uint8/uint16 array) into strips and send the chord.

    Canny runs on the image's gray conversion (`images.to_gray8`).
    """
    params = Params(low=float(low), high=float(high), strips=strips, codec=Codec(codec), quality=int(quality))
    params.validate()
    gray = load_gray(image, settings or Settings.from_env())
    return submit_gray(gray, params)


def submit_gray(gray: np.ndarray, params: Params) -> Job:
    """Send the chord for an (H, W) uint8 image whose parameters are already validated."""
    height, width = gray.shape
    count = params.strips or strips.default_strip_count(height, width)
    plan = strips.plan_strips(height, count, strips.halo_for(canny.HALO_NEEDED_ROWS))
    job = Job(id=str(uuid.uuid4()), width=width, height=height, strip_count=len(plan), params=params)
    spec = {
        "id": job.id, "width": width, "height": height, "strips": len(plan),
        "codec": params.codec.value, "quality": params.quality, "low": params.low, "high": params.high,
    }
    header = [
        canny_strip.s(
            spec,
            {"index": s.index, "row0": s.row0, "row1": s.row1, "top": s.top, "bottom": s.bottom},
            codec.encode_strip(gray[s.top:s.bottom], params.codec, params.quality),
        ).set(
            task_id=job.strip_task_id(s.index),
            # What Flower and logs show instead of kilobytes of pixels.
            argsrepr=f"job {job.id[:8]} strip {s.index + 1}/{len(plan)} rows {s.row0}-{s.row1}",
        )
        for s in plan
    ]
    body = stitch.s(spec).set(task_id=job.id, argsrepr=f"job {job.id[:8]} stitch {len(plan)} strips")
    chord(header, body).apply_async()
    return job
