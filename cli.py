"""luminagrid command line: `submit IMAGE...`, `status JOB`, `result JOB`, `cancel JOB...`, `ops`, ...

The only place where exceptions become exit codes: 0 success, 1 a luminagrid error (one line on
stderr), 2 a usage error (typer), 130 interrupted (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import time

STARTED = time.time()  # noqa: E402 - as early as possible: `--verbose` counts from process start

import contextlib  # noqa: E402
import functools  # noqa: E402
import glob  # noqa: E402
import importlib  # noqa: E402
import os  # noqa: E402
import secrets  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Annotated, Any, Optional, ParamSpec  # noqa: E402

import typer  # noqa: E402

from luminagrid import report  # noqa: E402
from luminagrid.errors import (  # noqa: E402
    CheckFailed,
    ConfigError,
    EmbeddedError,
    InputError,
    JobCancelled,
    JobFailed,
    LuminagridError,
    OutputError,
)
from luminagrid.settings import DEFAULT_OP, MAX_JOBS_IN_FLIGHT, Codec, Settings  # noqa: E402

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from luminagrid.status import Status


def _process_started() -> float:
    """When this process started (wall clock, from Linux's /proc; else when cli.py began)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime, in ticks since boot
        with open("/proc/uptime") as f:
            uptime_s = float(f.read().split()[0])
        return min(STARTED, time.time() - (uptime_s - ticks / os.sysconf("SC_CLK_TCK")))
    except (OSError, ValueError, IndexError):
        return STARTED


class _Later:
    """A module imported when first used: `--help` and light commands never load Celery or OpenCV
    (`import luminagrid.app` alone takes ~0.2 s)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


batch, broker, images, jobs, local, monitor, ops, job_params, source, stages = (
    _Later(f"luminagrid.{name}")
    for name in ("batch", "broker", "images", "jobs", "local", "monitor", "ops", "params", "source", "stages")
)
_celery = _Later("luminagrid.app")

HELP = "Exact, distributed image processing (Canny, blur, bilateral, denoise) on Celery and Redis."
HELP_SUBMIT = (
    "Run an operation (default: Canny edges) on IMAGES across the workers; write <stem>.<op>.png "
    "beside each (Canny: <stem>.edges.png). IMAGES may be files, folders and glob patterns. "
    "With LUMINAGRID_BROKER_URL unset and no Redis on localhost, runs embedded."
)
HELP_OPS = ("List the operations, built in and from installed packages (with package and version), and their "
            "parameters (for submit --op NAME -p NAME=VALUE).")
HELP_CHECK_OP = (
    "Check that operation NAME's declared halo is enough: its strips, cut on every row with exactly that halo, "
    "against the whole image, on generated images at its parameters' range ends. Exit 0 only if every case is "
    "identical; else 1, with the smallest halo that was. Runs in this process; needs no Redis."
)
HELP_CHECK_PARAM = "Hold a parameter at NAME=VALUE (the others are tried at their range ends); repeatable."
HELP_OP = ("Operation (default canny; also gaussian, bilateral, denoise, and those of installed packages). "
           "See `python cli.py ops`.")
HELP_PARAM = "An operation parameter as NAME=VALUE, e.g. -p d=9 -p sigma_color=75; repeatable."
HELP_OUT_DIR = "Folder for the outputs (created if missing). Default: beside each input."
HELP_JOBS = f"Images in flight at once in a batch (1-{MAX_JOBS_IN_FLIGHT})."
HELP_STATUS = "Show how far job JOB_ID has come, and where each unfinished strip is."
HELP_RESULT = "Wait for job JOB_ID (e.g. submitted with --detach) and write its output."
HELP_CANCEL = "Cancel jobs: workers skip their strips and their data is deleted from Redis."
HELP_WORKERS_CMD = "List the workers: liveness, pool size, strips running now, tasks processed."
HELP_DETACH = (
    "Return right after publishing, printing `job <id> <image> -> <output>` per image; the cluster "
    "runs the jobs (collect with `result JOB`). Needs a configured Redis, not embedded mode."
)
HELP_CLUSTER = (
    "Run a whole local system in the foreground: a private Redis, N workers and Flower. "
    "Prints the Flower URL and the line a second terminal needs to submit; Ctrl-C stops it all."
)
HELP_FLOWER_AUTH = ("Flower's basic-auth login, as USER:PASSWORD. Default: user luminagrid with a random "
                    "password, printed at start.")
FLOWER_USER = "luminagrid"
HELP_JSON = ("Print one JSON object per line on stdout (per image, job or worker; fields in the README); "
             "the usual text goes to stderr.")
HELP_FORCE = "Overwrite the output file if it exists (else refused)."
HELP_OUT = "Output file for a single IMAGE (lossless: .png, .tif, .bmp, ...). Default: <stem>.<op>.png beside it."
HELP_STRIPS = ("Number of horizontal strips. Default: the operation's strip size (Canny 4 MP, others 1-2 MP), at "
               "least 2 (Canny: 1 up to 1 MP); a file of one strip or less goes whole, as its file, to one worker.")
HELP_CODEC = "How strips travel: jpeg (smaller; exact w.r.t. the JPEG-decoded image) or lossless."
HELP_EMBEDDED = "Run on a private Redis and local workers even if a Redis is configured."
HELP_WORKERS = "Worker processes to start in embedded mode."
HELP_VERBOSE = "Also print where the time went: read, encode, publish, compute, stitch, write."
HELP_TIMEOUT = "Seconds to wait for the result; the job keeps running after that."

# Plain help: typer's rich help formatting imports rich's Markdown (~40 ms of a 0.2 s `--help`).
app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None)


class _Stderr:
    """rich's stderr console, made when first used (importing rich costs `--help` ~20 ms)."""

    console: Console | None = None

    def __getattr__(self, attr: str) -> Any:
        if self.console is None:
            from rich.console import Console  # noqa: PLC0415

            self.console = Console(stderr=True, highlight=False, soft_wrap=True)
        return getattr(self.console, attr)


err = _Stderr()


def _console(**options: Any) -> Console:
    """A console for the human output: stdout, or stderr under --json (stdout is the JSON's)."""
    from rich.console import Console  # noqa: PLC0415

    return Console(stderr=state["json"], **options)


def _say(text: str) -> None:
    """A line of the human output: on stdout, or on stderr under --json."""
    typer.echo(text, err=state["json"])


state = {"debug": False, "json": False}
P = ParamSpec("P")


@app.callback()
def main(debug: Annotated[bool, typer.Option(help="Show tracebacks of errors.")] = False) -> None:
    state["debug"] = debug
    if "--help" in sys.argv[1:]:
        return
    try:  # every command: a bad LUMINAGRID_* value is one line, before anything starts
        Settings.from_env()
    except ConfigError as exc:
        if debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def exits(command: Callable[P, None]) -> Callable[P, None]:
    """Map luminagrid's exceptions to exit codes: 1 with a one-line message, 130 on Ctrl-C."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            command(*args, **kwargs)
        except LuminagridError as exc:
            if state["debug"]:
                raise
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted; everything started locally was stopped.", err=True)
            raise typer.Exit(130) from None
        except Exception as exc:
            if state["debug"] or not isinstance(exc, jobs.REDIS_ERRORS):
                raise
            # Redis went away in the middle of a command.
            typer.echo(f"error: lost Redis at {broker.redacted(_celery.app.conf.broker_url)} ({exc}); check that it "
                       "is up and that LUMINAGRID_BROKER_URL is right, then run the command again.", err=True)
            raise typer.Exit(1) from None

    return wrapper


@contextlib.contextmanager
def _broker(settings: Settings, force_embedded: bool, workers: int) -> Iterator[str | None]:
    """Point the app at the Redis to use for the `with` block.

    Yields None for a configured (or default, answering) Redis; in embedded mode, runs a private
    Redis and local workers for the block and yields the note to print afterwards.
    """
    if not force_embedded and (settings.broker_url_explicit or broker.answers(settings.broker_url)):
        broker.require(settings.broker_url, master=settings.sentinel_master)
        _celery.use_broker(settings.broker_url, settings.result_backend, settings.sentinel_master,
                           settings.sentinel_password)
        yield None
        return
    with local.embedded(workers=1, concurrency=workers):
        yield (
            f"ran embedded: a private Redis and {workers} local worker process(es), now stopped. "
            "For a cluster: start Redis, run `celery -A luminagrid worker` on each node, "
            "and set LUMINAGRID_BROKER_URL=redis://HOST:6379/0 here."
        )


def _connect() -> Settings:
    """Use the configured Redis (no embedded fallback: a job id only means something there)."""
    settings = Settings.from_env()
    broker.require(settings.broker_url, master=settings.sentinel_master)
    _celery.use_broker(settings.broker_url, settings.result_backend, settings.sentinel_master,
                       settings.sentinel_password)
    return settings


def _say_cancelled_job(job_id: str | None, source: str) -> None:
    err.print(f"cancelled job {job_id} ({source}): its strips are skipped and its data deleted", markup=False)


def _cancel_on_interrupt(job: jobs.Job, source: str) -> None:
    """Ctrl-C or SIGTERM while waiting: the job must not run on without anyone to collect it."""
    try:
        job.cancel(fast=True)
        _say_cancelled_job(job.id, source)
    except jobs.REDIS_ERRORS as exc:
        err.print(f"could not cancel job {job.id} ({exc}); cancel it with: python cli.py cancel {job.id}", markup=False)


def _say_cancelled(exc: KeyboardInterrupt, source: str) -> None:
    """What an interrupted publish did with the job it was sending (`publish.Interrupted`)."""
    job_id, cancelled = getattr(exc, "job_id", None), getattr(exc, "cancelled", False)
    if job_id and cancelled:
        _say_cancelled_job(job_id, source)
    elif job_id:
        err.print(f"could not cancel job {job_id} (Redis is unreachable); the cluster fails it once its "
                  "submitter's key lapses", markup=False)


def _wait_and_write(job: jobs.Job, out: Path, timeout_s: float, label: str, overwrite: bool = True) -> jobs.JobResult:
    """Wait with a progress bar (on a terminal), write `out` atomically, then drop the job's data.

    Unless `overwrite`, an `out` that exists by then is refused (the job stays collectable).
    Interrupted, it cancels the job (its data is deleted; nothing runs on)."""
    try:  # from the first line: Ctrl-C during an import here must cancel the job too
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: PLC0415

        progress = Progress(
            TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("strips"), TimeElapsedColumn(),
            console=err, transient=True, disable=not err.is_terminal,
        )
        with progress:
            bar = progress.add_task("strips", total=job.strip_count)
            result = job.wait(
                timeout_s,
                on_progress=lambda done, _total: progress.update(bar, completed=done),
                on_notice=lambda text: err.print(f"note: {text}", markup=False),
                forget=False, fetch=False,  # `result.write` streams a Canny PNG from Redis
            )
        result.write(out, overwrite)  # streams where it can (Canny to PNG): the output is never whole in memory
    except JobCancelled:
        raise  # its record stays, so `status` can say so
    except JobFailed:
        job.forget_quietly()  # its payloads need not wait for the TTL; a timeout stays collectable
        raise
    except KeyboardInterrupt:
        _cancel_on_interrupt(job, label)  # (a half-written output was removed: writes are atomic)
        raise
    job.forget_quietly()  # written: Redis away now only delays the clean-up (the data expires)
    return result


def _stage_table(result: jobs.JobResult, wall_s: float) -> Table:
    """Where the time went (`--verbose`): wall-clock stages, then what the workers reported."""
    from rich.table import Table  # noqa: PLC0415

    table = Table(title=f"job {result.job_id[:8]}: time per stage", title_justify="left")
    table.add_column("stage")
    table.add_column("ms", justify="right")
    table.add_column("share", justify="right")
    for name, seconds in result.stages.ordered():
        table.add_row(name, f"{seconds * 1e3:.1f}", f"{seconds / wall_s:.0%}" if wall_s else "")
    other_s = wall_s - sum(seconds for _, seconds in result.stages.ordered())
    table.add_row("other (start-up, imports, embedded cluster)", f"{other_s * 1e3:.1f}", f"{other_s / wall_s:.0%}")
    table.add_row("total (from process start)", f"{wall_s * 1e3:.1f}", "", style="bold")
    for name, seconds in result.stages.worker_seconds.items():
        table.add_row(f"workers: {name} (sum over strips)", f"{seconds * 1e3:.1f}", "", style="dim")
    table.add_row("workers: slowest strip", f"{result.stages.slowest_strip_s * 1e3:.1f}", "", style="dim")
    return table


def _summary(source: str, job: jobs.Job, out: Path, result: jobs.JobResult, wall_s: float) -> str:
    served = ", ".join(f"{name} x{n}" for name, n in sorted(result.workers.items()))
    spec = job.spec
    codec_text = f"jpeg q{spec.quality}" if spec.codec is Codec.jpeg else "lossless"
    again = f" | {result.republished} recovery(ies) by the supervisor" if result.republished else ""
    return (
        f"{source} {job.width}x{job.height} {spec.op} -> {out} | {job.strip_count} strips ({codec_text}) | "
        f"served by {served}{again} | {wall_s:.2f} s"
    )


def _done(source: str | None, job: jobs.Job, out: Path, result: jobs.JobResult, wall_s: float) -> dict[str, Any]:
    """`_summary` as a JSON object (`--json`)."""
    spec = job.spec
    return report.image(
        source=source, status=report.DONE, op=spec.op, job_id=job.id, output=str(out), width=job.width,
        height=job.height, strips=job.strip_count, codec=spec.codec.value, quality=spec.quality,
        workers=result.workers, recoveries=result.republished, seconds=wall_s,
    )


def _emit_failed(exc: BaseException, source: str | None, params: job_params.Params | None, out: Path | None,
                 job: jobs.Job | None) -> None:
    """Under --json, the object of an image (or job) that failed with `exc`: "error" is its message.

    What it computes comes from the job if there is one, else from the command line's `params`."""
    if not state["json"]:
        return
    cancelled = isinstance(exc, (JobCancelled, KeyboardInterrupt))
    spec = job.spec if job is not None else None
    what: Any = spec or params
    report.emit(report.image(
        source=source, status=report.CANCELLED if cancelled else report.FAILED, op=what.op,
        job_id=job.id if job is not None else None, output=str(out) if out else None,
        width=spec.width if spec else None, height=spec.height if spec else None,
        strips=spec.strips if spec else None, codec=what.codec.value, quality=what.quality,
        error=str(exc) or (f"cancelled job {job.id}" if job is not None else "cancelled"),
    ))


def _given(given: list[str]) -> dict[str, str | float]:
    """`-p NAME=VALUE` options by name, as text (the operation parses them)."""
    values: dict[str, str | float] = {}
    for text in given:
        name, sep, value = text.partition("=")
        if not sep or not name.strip():
            raise InputError(f"-p {text!r} is not NAME=VALUE; write e.g. -p d=9.")
        values[name.strip()] = value
    return values


def _params(op: str, given: list[str], low: float | None, high: float | None, **rest: object) -> job_params.Params:
    """Validated job parameters from the command line (`-p NAME=VALUE`, and Canny's --low/--high)."""
    values = _given(given)
    for name, value in (("low", low), ("high", high)):
        if value is not None:
            if op != "canny":
                raise InputError(f"--{name} is a Canny threshold; for --op {op} use -p NAME=VALUE (see `cli.py ops`).")
            values[name] = value
    return job_params.Params(op=op, values=values, **rest).validate()  # type: ignore[arg-type]


def _reporter(params: job_params.Params) -> Callable[[batch.Item], None]:
    """Under --json, emits each image's object once, when it has ended (else does nothing)."""
    emitted: set[int] = set()

    def emit(item: batch.Item) -> None:
        if state["json"] and id(item) not in emitted and item.state in ("ok", "failed", "cancelled", "submitted"):
            emitted.add(id(item))
            report.emit(report.item(item, params.op, params.codec.value, params.quality))

    return emit


def _batch(
    items: list[batch.Item], params: job_params.Params, settings: Settings, timeout_s: float, in_flight: int,
) -> None:
    """Many images: one overall progress bar; notes and errors printed as they come (under --json,
    each image's object as it ends); an interrupt cancels the jobs in flight and says which."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: PLC0415

    progress = Progress(
        TextColumn("images"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
        TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal,
    )
    emit = _reporter(params)
    with progress:
        bar = progress.add_task("", total=len(items))

        def changed(item: batch.Item) -> None:
            finished = sum(1 for i in items if i.state in ("ok", "failed"))
            running = sum(1 for i in items if i.state == "running")
            progress.update(bar, completed=finished, description=f"{running} in flight")
            if item.state == "failed" and item.error:
                text = item.error if item.source in item.error else f"{item.source}: {item.error}"
                err.print(f"error: {text}", markup=False)
            emit(item)

        try:
            batch.run(items, params, settings, in_flight, timeout_s, on_change=changed,
                      on_notice=lambda item, text: err.print(f"note: {item.source}: {text}", markup=False))
        except KeyboardInterrupt:
            for i in items:
                if i.state == "cancelled":
                    _say_cancelled_job(i.job_id, i.source)
                emit(i)  # (the images not started get no object)
            raise


def _detached_line(item: batch.Item) -> str:
    return f"job {item.job_id} {item.source} -> {item.out}"


def _batch_table(items: list[batch.Item], wall_s: float) -> Table:
    ok = sum(1 for i in items if i.state == "ok")
    from rich.table import Table  # noqa: PLC0415

    table = Table(title=f"{len(items)} images: {ok} ok, {len(items) - ok} failed, {wall_s:.1f} s", title_justify="left")
    for name, justify in (("image", "left"), ("size", "right"), ("status", "left"), ("output / error", "left"), ("s", "right")):
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for i in items:
        size = f"{i.width}x{i.height}" if i.width else ""
        status = "[green]ok[/]" if i.state == "ok" else "[red]failed[/]"
        table.add_row(i.source, size, status, str(i.out) if i.state == "ok" else (i.error or ""), f"{i.seconds:.2f}")
    return table


@app.command(help=HELP_SUBMIT)
@exits
def submit(
    sources: Annotated[list[str], typer.Argument(metavar="IMAGES...", help="Images (PNG, JPEG, TIFF, BMP, WebP; 8/16-bit), folders or globs.")],
    op: Annotated[str, typer.Option("--op", help=HELP_OP)] = DEFAULT_OP,
    param: Annotated[Optional[list[str]], typer.Option("--param", "-p", help=HELP_PARAM)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help=HELP_OUT)] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out-dir", help=HELP_OUT_DIR)] = None,
    low: Annotated[Optional[float], typer.Option(help="Canny low threshold (0-2040; default 100).")] = None,
    high: Annotated[Optional[float], typer.Option(help="Canny high threshold (0-2040, >= low; default 200).")] = None,
    strips: Annotated[Optional[int], typer.Option(help=HELP_STRIPS)] = None,
    codec: Annotated[Codec, typer.Option(help=HELP_CODEC)] = Codec.jpeg,
    quality: Annotated[int, typer.Option(help="JPEG quality for --codec jpeg (1-100).")] = 95,
    timeout: Annotated[float, typer.Option(help=HELP_TIMEOUT)] = 600.0,
    in_flight: Annotated[int, typer.Option("--jobs", help=HELP_JOBS)] = 4,
    embedded: Annotated[bool, typer.Option("--embedded", help=HELP_EMBEDDED)] = False,
    detach: Annotated[bool, typer.Option("--detach", help=HELP_DETACH)] = False,
    workers: Annotated[int, typer.Option(help=HELP_WORKERS)] = os.cpu_count() or 1,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help=HELP_VERBOSE)] = False,
    as_json: Annotated[bool, typer.Option("--json", help=HELP_JSON)] = False,
) -> None:
    state["json"] = as_json
    params = _params(op, param or [], low, high, strips=strips, codec=codec, quality=quality)
    if not 1 <= in_flight <= MAX_JOBS_IN_FLIGHT:
        raise InputError(f"--jobs {in_flight} is out of range; use 1 to {MAX_JOBS_IN_FLIGHT}.")
    single = _is_single(sources)
    if out is not None and not single:
        raise OutputError("-o names one output file; with several images (or a folder or glob) use --out-dir DIR.")
    if out is not None and out_dir is not None:
        raise OutputError("-o and --out-dir both say where the output goes; give one of them.")
    if out_dir is not None:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"--out-dir {out_dir}: cannot create it ({exc.strerror}); choose another folder.") from None
    settings = Settings.from_env()
    if detach and (embedded or not (settings.broker_url_explicit or broker.answers(settings.broker_url))):
        raise EmbeddedError(
            "--detach leaves the job to the cluster, but embedded mode stops its workers when this command "
            "exits; start a cluster (`python cli.py cluster`, or Redis and `celery -A luminagrid worker`) "
            "and set LUMINAGRID_BROKER_URL."
        )
    if detach:
        _submit_detached(sources, params, settings, out, out_dir, single)
        return
    if single:
        _submit_one(Path(sources[0]), params, settings, out or images.default_output(
            Path(sources[0]), params.operation.suffix, out_dir), timeout, embedded, max(1, workers), verbose)
        return
    items = batch.expand(sources, params.operation.suffix, out_dir)
    # With nothing to submit (every argument failed already), just report: no Redis needed.
    needs_redis = any(i.state == "waiting" for i in items)
    with _broker(settings, embedded, max(1, workers)) if needs_redis else contextlib.nullcontext() as note:
        _batch(items, params, settings, timeout, in_flight)
    _console(width=max(100, _console().width)).print(_batch_table(items, time.time() - _process_started()))
    if note:
        _say(note)
    if any(i.state != "ok" for i in items):
        raise typer.Exit(1)


def _submit_one(image: Path, params: job_params.Params, settings: Settings, target: Path, timeout_s: float,
                embedded: bool, workers: int, verbose: bool) -> None:
    """One image: its errors end the command (under --json, after its object with "error")."""
    op = params.operation
    job: jobs.Job | None = None
    timing = stages.Stages()
    try:
        images.check_output(target, image)
        with timing.timed("read"):  # the header (or, where streaming cannot be exact, the whole image)
            src = source.open_source(image, settings.max_pixels)
        images.check_format(target, op.output_channels(src.channels), op.bilevel, op.name)
        file, plan = source.plan_for(src, params)
        if not file:  # decode while Celery and Redis's client are imported (~0.3 s) and Redis is found
            src.read_ahead(plan, timing)
    except LuminagridError as exc:
        _emit_failed(exc, str(image), params, target, None)
        raise
    with _broker(settings, embedded, workers) as note:
        try:
            try:
                job = jobs.submit_source(src, params, output=str(target.resolve()), settings=settings, stages=timing)
            except KeyboardInterrupt as exc:  # while the image was still being read and sent
                _say_cancelled(exc, image.name)
                raise
            del src  # its rows are sent; do not hold a whole-decoded image while waiting
            result = _wait_and_write(job, target, timeout_s, image.name)
        except (LuminagridError, KeyboardInterrupt) as exc:
            _emit_failed(exc, str(image), params, target, job)
            raise
    wall_s = time.time() - _process_started()  # from process start to now, embedded cluster stopped
    if state["json"]:
        report.emit(_done(str(image), job, target, result, wall_s))
    _say(_summary(str(image), job, target, result, wall_s))
    if verbose:
        _console().print(_stage_table(result, wall_s))
        if timing.note:
            _say(f"note: {timing.note}")
    if note:
        _say(note)


def _is_single(args: list[str]) -> bool:
    """One path that is neither a folder nor a pattern: a single job (its errors end the command)."""
    if len(args) != 1:
        return False
    path = Path(args[0])
    return not path.is_dir() and (path.exists() or not glob.has_magic(args[0]))


def _submit_detached(sources: list[str], params: job_params.Params, settings: Settings, out: Path | None,
                     out_dir: Path | None, single: bool) -> None:
    """Publish every image and print one line each: `job <id> <image> -> <output>` (under --json,
    its object, status "detached")."""
    if single:
        items = [batch.Item(source=sources[0], path=Path(sources[0]),
                            out=out or images.default_output(Path(sources[0]), params.operation.suffix, out_dir))]
    else:
        items = batch.expand(sources, params.operation.suffix, out_dir)
    with _broker(settings, False, 1):
        batch.run(items, params, settings, detach=True)
    emit = _reporter(params)
    for item in items:
        if item.state == "submitted":
            _say(_detached_line(item))
        else:
            err.print(f"error: {item.error}", markup=False)
        emit(item)
    if any(i.state != "submitted" for i in items):
        raise typer.Exit(1)


@app.command(name="ops", help=HELP_OPS)
@exits
def list_ops(
    json_out: Annotated[bool, typer.Option("--json", help=HELP_JSON)] = False,
) -> None:
    from rich.table import Table  # noqa: PLC0415

    state["json"] = json_out
    table = Table("op", "parameter", "default", "range", "meaning", title="operations (submit --op NAME -p NAME=VALUE)")
    for operation in ops.REGISTRY.values():
        origin = ops.origin(operation.name)
        table.add_row(f"[bold]{operation.name}[/]", "", "", "", f"{operation.summary} [dim](from {origin})[/]")
        for p in operation.params:
            table.add_row("", p.name, p.default_text, p.range_text, p.help)
        if json_out:
            report.emit({"op": operation.name, "package": origin.package, "version": origin.version,
                         "entry_point": origin.entry_point, "summary": operation.summary,
                         "params": [{"name": p.name, "kind": p.kind.__name__, "default": p.default,
                                     "range": p.range_text, "choices": list(p.choices) or None, "help": p.help}
                                    for p in operation.params]})
    _console(soft_wrap=True).print(table)
    for name, why in ops.broken().items():
        err.print(f"warning: operation {name} is not available: {why}", markup=False)
        if json_out:
            report.emit({"op": name, "error": why})


@app.command(name="check-op", help=HELP_CHECK_OP)
@exits
def check_op(
    name: Annotated[str, typer.Argument(metavar="NAME", help="An operation, as `cli.py ops` lists it.")],
    param: Annotated[Optional[list[str]], typer.Option("--param", "-p", help=HELP_CHECK_PARAM)] = None,  # noqa: UP045
    json_out: Annotated[bool, typer.Option("--json", help=HELP_JSON)] = False,
) -> None:
    from luminagrid import exactness  # noqa: PLC0415

    state["json"] = json_out
    op = ops.get(name)
    held = _given(param or [])
    op.values(held)  # bad names or values: refused before anything is printed
    origin = ops.origin(op.name)
    _say(f"check-op {op.name} ({origin}): strips cut on every row with the declared halo exactly, against the whole "
         "image; parameters at their range ends" + (f", {', '.join(sorted(held))} held" if held else ""))

    def said(v: exactness.Verdict) -> None:
        smallest = f"none up to {v.searched_rows}" if v.smallest_rows is None else str(v.smallest_rows)
        _say(f"  {'ok  ' if v.ok else 'FAIL'} {v.values_text}: declared halo {exactness.rows(v.declared_rows)}, smallest "
             f"identical {smallest}; {v.cases} cases")
        if v.failure is not None:
            _say(f"       e.g. {v.failure}")
        if json_out:
            report.emit({"op": op.name, "package": origin.package, "version": origin.version, "params": v.values,
                         "ok": v.ok, "declared_halo_rows": v.declared_rows, "smallest_halo_rows": v.smallest_rows,
                         "cases": v.cases, "failure": None if v.failure is None else str(v.failure)})

    result = exactness.check(op, held, on_verdict=said)
    failed = [v for v in result.verdicts if not v.ok]
    if failed:
        worst = failed[0]
        need = (f"no halo up to {exactness.rows(worst.searched_rows)} made every case identical (is it a local, "
                "deterministic operation?)") if worst.smallest_rows is None else (
            f"the smallest halo that made every case identical is {exactness.rows(worst.smallest_rows)}")
        raise CheckFailed(
            f"operation {op.name} ({origin}) is not exact across strips at {len(failed)} of {len(result.verdicts)} "
            f"parameter sets; at {worst.values_text} it declares a halo of {exactness.rows(worst.declared_rows)} and {need}; "
            f"fix its halo_rows(). First difference: {worst.failure}")
    cases = sum(v.cases for v in result.verdicts)
    _say(f"ok: {op.name} on strips is identical to the whole image in all {cases} cases at {len(result.verdicts)} "
         f"parameter sets ({result.seconds:.1f} s)")


def _ranges(indices: list[int]) -> str:
    """1-based, compressed: [0, 1, 2, 5] -> "1-3, 6"."""
    out, start = [], None
    for n, i in enumerate(indices):
        if start is None:
            start = i
        if n + 1 == len(indices) or indices[n + 1] != i + 1:
            out.append(f"{start + 1}" if start == i else f"{start + 1}-{i + 1}")
            start = None
    return ", ".join(out)


def _places(s: Status) -> list[str]:
    """Where the unfinished strips are, one line per holder (queued ones together)."""
    groups: dict[str, list[int]] = {}
    stitch = None
    for p in s.places:
        if p.where == "queued":
            label = "queued"
        else:
            label = f"held by {p.worker} ({'alive' if p.alive else 'lost'}{', running' if p.running else ''})"
        if p.index is None:
            stitch = label
        else:
            groups.setdefault(label, []).append(p.index)
    lines = [f"  strips {_ranges(ix)}/{s.strip_count}: {label}" for label, ix in groups.items()]
    if stitch:
        lines.append(f"  stitch: {stitch}")
    elif s.strips_done == s.strip_count and s.state not in ("done", "failed", "cancelled"):
        lines.append("  stitch: pending")
    return lines


@app.command(help=HELP_STATUS)
@exits
def status(
    job_id: Annotated[str, typer.Argument(help="The job id that submit printed.")],
    as_json: Annotated[bool, typer.Option("--json", help=HELP_JSON)] = False,
) -> None:
    state["json"] = as_json
    _connect()
    s = jobs.Job.find(job_id).status()
    if as_json:
        report.emit(report.status(s))
    _say(
        f"job {s.job_id}: {s.state} | {s.strips_done}/{s.strip_count} strips done, "
        f"{s.strips_started - s.strips_done} running | {s.width}x{s.height} | "
        f"submitted {s.age_s:.0f} s ago | output {s.output or '(not recorded)'}"
    )
    if s.state not in ("done", "cancelled"):
        for line in _places(s):
            _say(line)
    for event in s.events:
        _say(f"  recovered: {event}")
    for c in s.copies:
        why = "hung" if c.get("reason") == "hung" else "slow"
        _say(f"  copy: strip {int(c['strip']) + 1} ({why} on {c.get('origin')}) copied to {c.get('node')}: {c.get('outcome')}")
    if s.error:
        _say(f"error: {s.error}")


def _recorded_output(job: jobs.Job) -> Path:
    """Where `submit` said the job's output goes, checked as anything read from Redis is."""
    if not job.output:
        raise OutputError(f"job {job.id} has no recorded output path; give one with -o.")
    out = Path(job.output)
    if not out.is_absolute():  # `submit` records absolute paths
        raise OutputError(f"job {job.id}'s recorded output path {job.output!r} is not absolute: it was not "
                          "recorded by `submit`; give the output file with -o.")
    try:
        images.check_output(out)
    except OutputError as exc:
        detail = str(exc).rstrip(".")
        raise OutputError(f"job {job.id}'s recorded output path: {detail}; or give another with -o.") from None
    return out


@app.command(help=HELP_RESULT)
@exits
def result(
    job_id: Annotated[str, typer.Argument(help="The job id that submit printed.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output file. Default: submit's.")] = None,
    timeout: Annotated[float, typer.Option(help=HELP_TIMEOUT)] = 600.0,
    force: Annotated[bool, typer.Option("--force", help=HELP_FORCE)] = False,
    as_json: Annotated[bool, typer.Option("--json", help=HELP_JSON)] = False,
) -> None:
    state["json"] = as_json
    started = time.perf_counter()
    _connect()
    job = jobs.Job.find(job_id)
    try:
        op = job.spec.operation  # (OperationUnavailable where this node lacks the job's operation)
        if out is None:
            out = _recorded_output(job)
        else:
            images.check_output(out)
        if not force and (out.exists() or out.is_symlink()):
            raise images.exists_error(out)
        images.check_format(out, job.spec.channels, op.bilevel, op.name)
        result = _wait_and_write(job, out, timeout, job_id[:8], overwrite=force)
    except (LuminagridError, KeyboardInterrupt) as exc:
        _emit_failed(exc, None, None, out, job)
        raise
    wall_s = time.perf_counter() - started
    if as_json:
        report.emit(_done(None, job, out, result, wall_s))
    _say(_summary(f"job {job_id}", job, out, result, wall_s))


@app.command(help=HELP_CANCEL)
@exits
def cancel(job_ids: Annotated[list[str], typer.Argument(metavar="JOB...", help="Job ids that submit printed.")]) -> None:
    _connect()
    failed = False
    for job_id in job_ids:
        try:
            job = jobs.Job.find(job_id)
            state = job.status().state
            if state == "done":
                raise OutputError(f"job {job_id} has already finished; nothing to cancel (collect it with "
                                  f"`python cli.py result {job_id}`).")
            if state == "failed":
                raise OutputError(f"job {job_id} has already failed; nothing to cancel (`python cli.py status "
                                  f"{job_id}` says why).")
            if state == "cancelled":
                typer.echo(f"job {job_id} was already cancelled")
                continue
            job.cancel()
            typer.echo(f"cancelled job {job_id}: its strips are skipped and its data deleted")
        except LuminagridError as exc:
            typer.echo(f"error: {exc}", err=True)
            failed = True
    if failed:
        raise typer.Exit(1)


@app.command(help=HELP_WORKERS_CMD)
@exits
def workers(
    timeout: Annotated[float, typer.Option(help="Seconds to wait for answers.")] = 2.0,
    as_json: Annotated[bool, typer.Option("--json", help=HELP_JSON)] = False,
) -> None:
    state["json"] = as_json
    _connect()
    nodes = monitor.list_workers(timeout)
    from rich.table import Table  # noqa: PLC0415

    table = Table("worker", "host", "liveness", "pool", "active strips", "processed")
    for w in nodes:
        if as_json:
            report.emit(report.worker(w))
        table.add_row(w.name, w.host, w.liveness, str(w.pool_processes) if w.pool_processes else "",
                      str(w.active_strips), str(w.processed) if w.online else "")
    _console(soft_wrap=True).print(table)


def _flower_login(given: str | None) -> str:
    """`--flower-auth` checked (never echoed: it holds a password), or a new random login."""
    if given is None:
        return f"{FLOWER_USER}:{secrets.token_urlsafe(12)}"
    user, sep, password = given.partition(":")
    if not (sep and user.strip() and password) or "," in given:
        shown = f"{user}:***" if sep else "(no ':' in it)"
        raise ConfigError(f"--flower-auth (or LUMINAGRID_FLOWER_AUTH) {shown} is not USER:PASSWORD, both "
                          "non-empty and without commas; write e.g. --flower-auth admin:SECRET, or leave it out "
                          "for a random password.")
    return given


@app.command(help=HELP_CLUSTER)
@exits
def cluster(
    workers: Annotated[int, typer.Option(help="Worker processes to start.")] = 2,
    flower_port: Annotated[int, typer.Option(help="Port for Flower on 127.0.0.1.")] = 5555,
    flower_auth: Annotated[
        Optional[str], typer.Option(help=HELP_FLOWER_AUTH, envvar="LUMINAGRID_FLOWER_AUTH")
    ] = None,
) -> None:
    login = _flower_login(flower_auth)
    user, _, password = login.partition(":")
    # AOF: queued jobs survive a restart of its Redis (files in the cluster's folder, for its lifetime).
    with local.LocalCluster(workers=max(1, workers), concurrency=1, appendonly=True) as c:
        assert c.folder is not None
        flower = local.LocalFlower(c.url, flower_port, login, log_path=c.folder / "flower.log").start()
        try:
            typer.echo(f"luminagrid cluster: Redis at {c.url}, {len(c.nodes)} worker(s), Flower at {flower.url}/")
            typer.echo(f"In another terminal:  export LUMINAGRID_BROKER_URL={c.url}")
            typer.echo("then:                 python cli.py submit IMAGE")
            if flower_auth is None:
                typer.echo(f"Flower login:         user {user}, password {password} (made for this run; "
                           "choose one with --flower-auth USER:PASSWORD)")
            else:
                typer.echo(f"Flower login:         user {user}, the password given with --flower-auth")
            typer.echo("Ctrl-C stops everything.", err=False)
            while not (gone := c.dead() + (["flower"] if flower.proc and flower.proc.poll() is not None else [])):
                time.sleep(0.5)
            raise EmbeddedError(f"{', '.join(gone)} exited; logs are in {c.folder}")
        except KeyboardInterrupt:
            typer.echo("stopping: Flower, workers, Redis")
        finally:
            flower.stop()


def _on_sigterm(*_: object) -> None:
    raise KeyboardInterrupt


def main_entry() -> None:
    """Run the app; typer itself turns usage errors into exit code 2."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        app()
    except SystemExit as exc:  # how click ends every command, with its exit code
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        if not isinstance(exc.code, int | None):
            print(exc.code, file=sys.stderr)
    else:
        code = 0
    # Every command has finished its work here: its output is written and closed, Redis has its
    # writes, and local processes were stopped by their `with` blocks. Tearing the interpreter
    # down (Celery, kombu, numpy, OpenCV: ~0.1 s) would only make the user wait.
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main_entry()
