"""Per-stage timing of a job: where its wall-clock time went.

Stages, in pipeline order (seconds): `read` (decode the input file), `convert` (to the 8-bit
gray or BGR the operation computes on), `encode` (strip payloads), `publish` (each strip onto
Redis), `compute` (from the last strip published to every strip done, as the submitter sees it),
`stitch` (the stitch task's own work), `collect` (fetch and unpack the result), `write` (the
output file, CLI only). A streamed file's reading runs beside converting, encoding and
publishing, so those four overlap. Workers also report CPU seconds summed over strips.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

ORDER = ("read", "convert", "encode", "publish", "compute", "stitch", "collect", "write")


@dataclass
class Stages:
    """Seconds per stage (wall clock, this process), plus what the workers reported."""

    seconds: dict[str, float] = field(default_factory=dict)
    #: CPU-side seconds summed over all strips: decode, compute, pack (from the strip results)
    worker_seconds: dict[str, float] = field(default_factory=dict)
    #: the slowest strip's own compute time, seconds
    slowest_strip_s: float = 0.0
    #: moments of the job (e.g. "first strip published"), seconds since `start`, the first time each
    events: dict[str, float] = field(default_factory=dict)
    #: (seconds since `start`, what, value), in order: ("read", rows decoded so far) and
    #: ("published", strips sent so far) per strip: a job's time line (bench/run.py charts it)
    timeline: list[tuple[float, str, int]] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)
    #: something the user should know about how the job ran (e.g. why the input was not streamed)
    note: str = ""

    def mark(self, event: str) -> None:
        """Note the first time `event` happens."""
        self.events.setdefault(event, time.perf_counter() - self.start)

    def log(self, what: str, value: int) -> None:
        self.timeline.append((time.perf_counter() - self.start, what, value))

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def ordered(self) -> list[tuple[str, float]]:
        return [(name, self.seconds[name]) for name in ORDER if name in self.seconds]
