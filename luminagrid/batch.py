"""Many images at once: expand files, folders and globs; keep a bounded number of jobs in flight.

    items = batch.expand(["scans/", "extra/*.tif", "one.png"], suffix="denoise", out_dir=Path("out"))
    outcomes = batch.run(items, params, settings, max_in_flight=4)

Each image is its own job. One that cannot be read, fails on the workers, or times out is
reported as failed; the others go on. Outputs are written as their jobs finish, atomically.
An interrupt (Ctrl-C, SIGTERM) cancels the jobs in flight; `detach=True` only submits.
"""

from __future__ import annotations

import glob
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from luminagrid import images, jobs, ops, source
from luminagrid.errors import JobCancelled, JobFailed, LuminagridError
from luminagrid.settings import MAX_JOBS_IN_FLIGHT, Settings

#: Files a folder contributes (by suffix, case-insensitive); outputs of any operation are skipped.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".pgm", ".ppm", ".pbm")
MAX_IN_FLIGHT = MAX_JOBS_IN_FLIGHT
#: How long a batch sleeps when none of its jobs moved, in seconds (each job's waiter paces its own
#: looks at Redis: `jobs.POLL_FAST_S`, then `jobs.POLL_SLOW_S`).
POLL_S = 0.02


@dataclass
class Item:
    """One image of a batch and what became of it."""

    #: the input as the user can recognise it
    source: str
    path: Path | None
    out: Path | None = None
    #: "waiting", "running", "ok", "failed", "cancelled" or (detached) "submitted"
    state: str = "waiting"
    error: str | None = None
    width: int = 0
    height: int = 0
    strips: int = 0
    seconds: float = 0.0
    job_id: str | None = None
    workers: dict[str, int] = field(default_factory=dict)
    #: the supervisor's recoveries for its job
    recoveries: int = 0

    def fail(self, error: str) -> None:
        self.state, self.error = "failed", error


def _is_output(path: Path) -> bool:
    """`photo.edges.png`, `photo.denoise.png`: what luminagrid writes, not what it should read."""
    parts = path.name.split(".")
    return len(parts) >= 3 and parts[-2] in {op.suffix for op in ops.REGISTRY.values()}


def expand(args: Iterable[str], suffix: str, out_dir: Path | None = None) -> list[Item]:
    """Items for files, folders (their images, not recursive) and glob patterns, in order.

    Folders and patterns skip luminagrid's own outputs (`photo.edges.png`); a file named
    explicitly is always taken.

    An argument that names nothing becomes a failed item, as does an image whose output path
    another image of the batch already claims. Duplicates of the same file are dropped.
    """
    items: list[Item] = []
    seen: set[Path] = set()
    claimed: dict[Path, str] = {}

    def add(path: Path) -> None:
        key = path.resolve()
        if key in seen:
            return
        seen.add(key)
        item = Item(source=str(path), path=path, out=images.default_output(path, suffix, out_dir))
        other = claimed.setdefault(item.out.resolve(), item.source)
        if other != item.source:
            item.fail(f"its output {item.out} is also {other}'s; give them separate --out-dir runs or rename one.")
        items.append(item)

    for arg in args:
        path = Path(arg)
        if path.is_dir():
            try:
                found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not _is_output(p))
            except OSError as exc:
                items.append(Item(source=arg, path=None, state="failed",
                                  error=f"{arg}: cannot list the folder ({exc.strerror}); check its permissions."))
                continue
            if not found:
                items.append(Item(source=arg, path=None, state="failed",
                                  error=f"{arg} holds no images ({', '.join(IMAGE_SUFFIXES)}); check the folder."))
            for p in found:
                add(p)
        elif not path.exists() and glob.has_magic(arg):
            matches = sorted(Path(m) for m in glob.glob(arg) if Path(m).is_file() and not _is_output(Path(m)))
            if not matches:
                items.append(Item(source=arg, path=None, state="failed",
                                  error=f"no file matches {arg!r}; check the pattern."))
            for p in matches:
                add(p)
        else:
            add(path)  # a missing file fails when it is read, with the usual message
    return items


@dataclass
class _Flight:
    item: Item
    job: jobs.Job
    waiter: jobs.Waiter
    started: float
    #: the output being written (in the writer thread), once the result is in
    writing: Future[None] | None = None


def run(
    items: list[Item],
    params: jobs.Params,
    settings: Settings,
    max_in_flight: int = 4,
    timeout_s: float = 600.0,
    on_change: Callable[[Item], None] | None = None,
    on_notice: Callable[[Item, str], None] | None = None,
    detach: bool = False,
) -> tuple[list[Item], int]:
    """Process every waiting item; return the items and the most jobs that were in flight at once.

    `params` must be validated. `on_change` hears of each item that starts, finishes or fails;
    `on_notice` passes on the waiting notes (no workers, Redis outages). Finished outputs are
    written in a helper thread (OpenCV's encoders release the GIL), so the submitter's file work
    overlaps the workers' computing. With `detach`, every image is submitted (state "submitted",
    with its job id) and nothing is waited for. An interrupt cancels the jobs in flight (state
    "cancelled") and is raised again.
    """
    changed = on_change or (lambda _item: None)
    queue = deque(i for i in items if i.state == "waiting")
    flying: list[_Flight] = []
    peak = 0
    for item in items:
        if item.state == "failed":
            changed(item)
    if detach:
        for item in queue:
            if _submit(item, params, settings) is not None:
                item.state = "submitted"
            changed(item)
        return items, 0
    try:
        peak = _run(queue, flying, params, settings, max_in_flight, timeout_s, changed, on_notice)
    except KeyboardInterrupt:
        for flight in flying:
            if flight.writing is not None:  # its output is written (the writer finished it on exit)
                flight.job.forget_quietly()
                flight.item.state = "ok"
                continue
            try:
                flight.job.cancel(fast=True)
                flight.item.state, flight.item.error = "cancelled", f"cancelled job {flight.job.id}"
            except jobs.REDIS_ERRORS as exc:
                flight.item.fail(f"could not cancel job {flight.job.id} ({exc}); cancel it with: "
                                 f"python cli.py cancel {flight.job.id}")
            changed(flight.item)
        raise
    return items, peak


def _submit(item: Item, params: jobs.Params, settings: Settings) -> jobs.Job | None:
    """Read, convert and submit one image; on a luminagrid error mark it failed and return None."""
    try:
        assert item.path is not None and item.out is not None
        images.check_output(item.out, item.path)
        src = source.open_source(item.path, settings.max_pixels)
        op = params.operation
        images.check_format(item.out, op.output_channels(src.channels), op.bilevel, op.name)
        job = jobs.submit_source(src, params, output=str(item.out.resolve()), settings=settings)
        item.height, item.width, item.strips = job.height, job.width, job.strip_count
    except LuminagridError as exc:
        item.fail(str(exc))
        return None
    except KeyboardInterrupt as exc:  # while sending it: `publish.Interrupted` cancelled what went out
        if getattr(exc, "cancelled", False):
            item.job_id, item.state = exc.job_id, "cancelled"  # type: ignore[attr-defined]
        raise
    item.job_id = job.id
    return job


def _run(
    queue: deque[Item], flying: list[_Flight], params: jobs.Params, settings: Settings, max_in_flight: int,
    timeout_s: float, changed: Callable[[Item], None], on_notice: Callable[[Item, str], None] | None,
) -> int:
    """The loop of `run`: keep `max_in_flight` jobs going; return the most that flew at once."""
    peak = 0
    with ThreadPoolExecutor(1, "lg-write") as writer:
        while queue or flying:
            busy = False  # did anything happen this round? then look again at once
            while queue and len(flying) < max_in_flight:
                # Read in this thread: `images.read_image` captures file descriptor 2 while it
                # decodes, which would swallow (and misread) what other threads print meanwhile.
                item = queue.popleft()
                started = time.monotonic()
                job = _submit(item, params, settings)
                if job is None:
                    changed(item)
                    continue
                item.state = "running"
                notice = (lambda it: lambda text: on_notice(it, text))(item) if on_notice else None
                flying.append(_Flight(item, job, job.waiter(timeout_s, on_notice=notice), started))
                peak = max(peak, len(flying))
                changed(item)
                busy = True
            for flight in list(flying):
                try:
                    if flight.writing is None:
                        result = flight.waiter.step()
                        if result is not None:
                            flight.writing = writer.submit(result.write, flight.item.out)  # type: ignore[arg-type]
                            flight.item.workers, flight.item.recoveries = result.workers, result.republished
                            busy = True
                        continue
                    if not flight.writing.done():
                        continue
                    flight.writing.result()
                    flight.job.forget_quietly()
                    flight.item.state = "ok"
                except JobCancelled as exc:  # by someone else: its record stays, for `status`
                    flight.item.fail(str(exc))
                except JobFailed as exc:
                    flight.item.fail(str(exc))
                    flight.job.forget_quietly()  # a failed job's payloads need not wait for the TTL
                except LuminagridError as exc:  # a timeout stays collectable with `cli.py result`
                    flight.item.fail(str(exc))
                except jobs.REDIS_ERRORS as exc:  # Redis went away while its output was fetched
                    flight.item.fail(f"its output could not be fetched from Redis ({exc}); collect it with "
                                     f"python cli.py result {flight.job.id}")
                flight.item.seconds = time.monotonic() - flight.started
                flying.remove(flight)
                changed(flight.item)
                busy = True
            if not busy:
                time.sleep(POLL_S)
    return peak
