"""Is an operation's halo enough? Its strips against `apply` on the whole image, in process.

`check` runs an operation (built in or from a plugin) the way the cluster does, without Celery:
`compute` on each strip plus its halo, then `pack`, `stitch` and `collect`, and compares the
result pixel for pixel with `apply` on the whole image. The strips are cut on every row (not on
JPEG's 8-row grid) and carry exactly the halo the operation declares, so a halo one row short
shows even where the cluster's rounding up to 8 rows would hide it today.

The cases: generated images (noise, sparse impulses, a photo-like scene; gray, and colour if the
operation computes in colour; one row, a few halos tall, many halos tall), cut into 2, 3, 7 and
up to 12 strips (strips thinner than the halo included), at parameter sets with each free
parameter at each end of its range (every choice of a choice parameter), and all free numbers at
their low ends and all at their high ends (with every combination of choices). For each
parameter set it also finds the smallest halo that makes every case identical, so a failing
check says what the halo should have been.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from luminagrid import ops, strips
from luminagrid.errors import InputError

#: Image contents, in the order they are tried (the most revealing first).
CONTENTS = ("noise", "impulses", "photo")
#: Most strips a case is cut into (the 1-row strips of a small image, at most).
MAX_CASE_STRIPS = 12
#: Most combinations of choice parameters' values tried (each with the numbers low and high).
MAX_CHOICE_SETS = 64
#: A failing halo is searched upwards to at least this many rows (and to 4 times the declared).
SEARCH_MIN_ROWS = 64
#: Images are sized for a halo of at least this many rows (so small halos still get strips
#: with full halos on both sides).
MIN_REACH_ROWS = 4
#: Width of the generated images (columns add little: the halo is about rows).
WIDTHS = (29, 47)


def rows(count: int) -> str:
    """"1 row", "5 rows"."""
    return f"{count} row{'s' * (count != 1)}"


def picture(content: str, height: int, width: int, channels: int, seed: int) -> np.ndarray:
    """A generated (height, width[, 3]) uint8 image. `noise`: every sample uniform in 0-255;
    `impulses`: black with 3% white pixels and 3% mid-gray, which spreads far under any filter;
    `photo`: smooth blobs, a gradient and thin lines (long edges cross every seam)."""
    rng = np.random.default_rng(seed)
    shape = (height, width) if channels == 1 else (height, width, channels)
    if content == "noise":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if content == "impulses":
        draw = rng.random(shape)
        return np.where(draw < 0.03, 255, np.where(draw < 0.06, 128, 0)).astype(np.uint8)
    img = cv2.GaussianBlur(rng.normal(0, 60, (height, width)).astype(np.float32), (0, 0), 2.0) * 3
    img += np.linspace(0, 80, width, dtype=np.float32)[None, :] + 90
    for _ in range(max(1, (height + width) // 30)):
        p1 = tuple(int(v) for v in rng.integers(0, [width, height]))
        p2 = tuple(int(v) for v in rng.integers(0, [width, height]))
        cv2.line(img, p1, p2, float(rng.integers(0, 256)), 1)
    gray = np.clip(img, 0, 255).astype(np.uint8)
    if channels == 1:
        return gray
    return np.dstack([np.clip(gray.astype(np.int16) + rng.integers(-30, 31, gray.shape), 0, 255).astype(np.uint8)
                      for _ in range(channels)])


@dataclass(frozen=True)
class Case:
    """One comparison: a generated image cut into `count` strips."""

    content: str
    height: int
    width: int
    channels: int
    count: int
    seed: int

    def __str__(self) -> str:
        colour = "colour" if self.channels == 3 else "gray"
        return f"{self.width}x{self.height} {colour} {self.content} in {self.count} strip{'s' * (self.count > 1)}"


def cases_for(op: ops.Operation, reach_rows: int) -> list[Case]:
    """The cases for halos of up to about `reach_rows`: images 1 row, 2*reach + 5 rows and
    4*reach + 21 rows tall, so that a strip boundary lies more than `reach_rows` from both image
    edges. The tall images come first: a halo that is too small shows there soonest."""
    tall, short = 4 * reach_rows + 21, 2 * reach_rows + 5
    found = []
    for channels in (1, 3) if op.colour else (1,):
        for i, content in enumerate(CONTENTS):
            seed = 1000 * channels + 10 * i
            found += [Case(content, tall, WIDTHS[1], channels, count, seed) for count in (3, 2, 7)]
            found += [Case(content, short, WIDTHS[0], channels, count, seed + 1)
                      for count in (2, min(short, MAX_CASE_STRIPS))]
            found.append(Case(content, 1, WIDTHS[0], channels, 1, seed + 2))
    return sorted(found, key=lambda c: -c.height)  # stable: noise first within a height


def distributed(op: ops.Operation, pixels: np.ndarray, count: int, halo_rows: int, values: ops.Values,
                align_rows: int = 1) -> np.ndarray:
    """What the workers and the stitch compute, without Celery: `compute` and `pack` on each strip
    (cut on a grid of `align_rows`, with `halo_rows` exactly), then `stitch` and `collect`."""
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    parts = []
    for s in strips.plan_strips(height, count, halo_rows, align_rows):
        # A copy, as a worker has its own decoded strip: an `apply` that writes into its input
        # must not change its neighbours' halos (nor the image the next case reuses).
        packed = op.pack(op.compute(pixels[s.top:s.bottom].copy(), s, height, values))
        parts.append({**packed, "index": s.index, "row0": s.row0, "row1": s.row1})
    return op.collect(op.stitch(parts, width, channels), height, width, channels)  # as the job's spec.channels


@dataclass(frozen=True)
class Mismatch:
    """How a case's strips differed from the whole image at some halo."""

    case: Case
    halo_rows: int
    #: first differing pixel (row, column), how many differ; or the error the operation raised
    at: tuple[int, int] | None = None
    pixels: int = 0
    error: str | None = None

    def __str__(self) -> str:
        if self.error is not None:
            return f"{self.case} with a halo of {rows(self.halo_rows)}: {self.error}"
        assert self.at is not None
        return (f"{self.case} with a halo of {rows(self.halo_rows)}: {self.pixels} pixel{'s' * (self.pixels > 1)} "
                f"differ, the first at row {self.at[0]}, column {self.at[1]}")


@dataclass
class Verdict:
    """The check of one parameter set."""

    values: ops.Values
    #: the halo the operation declares at these values (`halo_rows`, not rounded up)
    declared_rows: int
    cases: int = 0
    #: the first case that differed at the declared halo (None: all identical)
    failure: Mismatch | None = None
    #: the smallest halo at which every case was identical (None: none up to `searched_rows`)
    smallest_rows: int | None = None
    searched_rows: int = 0

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def values_text(self) -> str:
        return " ".join(f"{k}={v:g}" if not isinstance(v, str) else f"{k}={v}" for k, v in self.values.items()) or "-"


@dataclass
class Report:
    verdicts: list[Verdict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(v.ok for v in self.verdicts)


class _Cases:
    """The cases of one parameter set, with each image and its whole-image result made once."""

    def __init__(self, op: ops.Operation, values: ops.Values, reach_rows: int) -> None:
        self.op, self.values = op, values
        self.cases = cases_for(op, max(reach_rows, MIN_REACH_ROWS))
        self._wholes: dict[tuple[str, int, int, int, int], tuple[np.ndarray, np.ndarray | str]] = {}
        self.first = 0  # the case that failed last is tried first at the next halo

    def _whole(self, c: Case) -> tuple[np.ndarray, np.ndarray | str]:
        key = (c.content, c.height, c.width, c.channels, c.seed)
        if key not in self._wholes:
            pixels = self.op.prepare(picture(c.content, c.height, c.width, c.channels, c.seed))
            try:
                self._wholes[key] = pixels, self.op.apply(pixels.copy(), self.values)  # (copy: see `distributed`)
            except Exception as exc:  # noqa: BLE001 - the operation's own failure is the finding
                self._wholes[key] = pixels, f"apply on the whole image raised {type(exc).__name__}: {exc}"
        return self._wholes[key]

    def compare(self, c: Case, halo_rows: int) -> Mismatch | None:
        pixels, whole = self._whole(c)
        if isinstance(whole, str):
            return Mismatch(c, halo_rows, error=whole)
        try:
            out = distributed(self.op, pixels, c.count, halo_rows, self.values)
        except Exception as exc:  # noqa: BLE001
            return Mismatch(c, halo_rows, error=f"the strip path raised {type(exc).__name__}: {exc}")
        if out.shape != whole.shape or out.dtype != whole.dtype:
            return Mismatch(c, halo_rows, error=f"strips gave {out.shape} {out.dtype}, the whole image "
                                                 f"{whole.shape} {whole.dtype}")
        differ = out != whole
        if not differ.any():
            return None
        at = np.argwhere(differ)[0]
        return Mismatch(c, halo_rows, at=(int(at[0]), int(at[1])), pixels=int(differ.sum()))

    def first_mismatch(self, halo_rows: int) -> Mismatch | None:
        """The first case whose strips differ at `halo_rows`, or None if every case is identical."""
        order = [*range(self.first, len(self.cases)), *range(self.first)]
        for i in order:
            found = self.compare(self.cases[i], halo_rows)
            if found is not None:
                self.first = i
                return found
        return None


def smallest_halo(cases: _Cases, declared_rows: int, declared_ok: bool) -> tuple[int | None, int]:
    """The smallest halo at which every case is identical, and the largest halo tried; `cases`
    are those the declared halo was checked on (their images and whole results made already).

    A bisection, on the premise that more halo never hurts (a strip with more of its neighbours
    is closer to the whole image). If the declared halo passed, it searches below it on the same
    images; if not, it tries 1, 2, 4, ... rows more (on images a few times taller than the halo
    tried) up to 4 times the declared halo or `SEARCH_MIN_ROWS`, then bisects; None if none of
    those makes every case identical (the operation is not local, or not deterministic)."""
    if declared_ok:
        bad, good = -1, declared_rows
    else:
        bad, step, limit = declared_rows, 1, min(ops.MAX_HALO_ROWS, max(SEARCH_MIN_ROWS, 4 * declared_rows))
        while True:
            good = min(declared_rows + step, limit)
            cases = _Cases(cases.op, cases.values, good)
            if cases.first_mismatch(good) is None:
                break
            if good >= limit:
                return None, good
            bad, step = good, 2 * step
    searched = good
    while good - bad > 1:
        mid = (bad + good) // 2
        if cases.first_mismatch(mid) is None:
            good = mid
        else:
            bad = mid
    return good, searched


def parameter_sets(op: ops.Operation, fixed: Mapping[str, Any]) -> list[ops.Values]:
    """The defaults (with `fixed` given by the user), then each free parameter at each end of its
    range, then the free numbers all at their low ends and all at their high ends (with each
    combination of the free choice parameters' values); validated (sets the
    operation refuses, such as Canny's low above high, are left out); each once."""
    base = op.values(fixed)
    free = [p for p in op.params if p.name not in fixed]
    candidates = [dict(base)]
    for p in free:
        candidates += [{**base, p.name: end} for end in p.ends]
    numbers = [p for p in free if p.kind is not str]
    words = [p for p in free if p.kind is str]
    # every combination of choices (at most MAX_CHOICE_SETS) with the numbers all low, all high
    for combo in itertools.islice(itertools.product(*(p.choices for p in words)), MAX_CHOICE_SETS):
        chosen = {p.name: c for p, c in zip(words, combo)}
        candidates += [{**base, **chosen, **{p.name: p.ends[end] for p in numbers}} for end in (0, -1)]
    found: list[ops.Values] = []
    for values in candidates:
        try:
            checked = op.values(values)
        except InputError:
            continue
        if checked not in found:
            found.append(checked)
    return found


def check_values(op: ops.Operation, values: ops.Values, find_smallest: bool = True) -> Verdict:
    """The check at one parameter set: every case at the declared halo, then (if `find_smallest`)
    the smallest halo that makes every case identical."""
    declared = op.halo_rows(values)
    cases = _Cases(op, values, declared)
    verdict = Verdict(values=values, declared_rows=declared, cases=len(cases.cases))
    verdict.failure = cases.first_mismatch(declared)
    if find_smallest:
        verdict.smallest_rows, verdict.searched_rows = smallest_halo(cases, declared, verdict.ok)
    return verdict


def check(op: ops.Operation, fixed: Mapping[str, Any] | None = None,
          on_verdict: Callable[[Verdict], None] | None = None, find_smallest: bool = True) -> Report:
    """Check `op` at every parameter set (`parameter_sets`); `on_verdict` sees each as it is done.
    `fixed`: parameters the user set (`-p NAME=VALUE`), held at those values."""
    started = time.perf_counter()
    report = Report()
    for values in parameter_sets(op, fixed or {}):
        verdict = check_values(op, values, find_smallest)
        report.verdicts.append(verdict)
        if on_verdict is not None:
            on_verdict(verdict)
    report.seconds = time.perf_counter() - started
    return report


def iter_cases(op: ops.Operation, values: ops.Values) -> Iterator[Case]:
    """The cases `check_values` runs at `values` (for tests and the README)."""
    yield from _Cases(op, values, op.halo_rows(values)).cases
