"""luminagrid command line: `python cli.py submit IMAGE`.

The only place where exceptions become exit codes: 0 success, 1 a luminagrid error (one line on
stderr), 2 a usage error (typer), 130 interrupted (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Optional, ParamSpec

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from luminagrid import broker, images, jobs, local
from luminagrid.app import use_broker
from luminagrid.codec import Codec
from luminagrid.errors import LuminagridError
from luminagrid.settings import Settings

HELP = "Exact, distributed edge detection on Celery and Redis."
HELP_SUBMIT = (
    "Detect edges (Canny on the gray image) in IMAGE across the workers; write IMAGE-stem.edges.png. "
    "With LUMINAGRID_BROKER_URL unset and no Redis on localhost, runs embedded."
)
HELP_OUT = "Output file (lossless format: .png, .tif, .bmp, ...). Default: <stem>.edges.png beside IMAGE."
HELP_STRIPS = "Number of horizontal strips. Default: about one per megapixel, at least 2."
HELP_CODEC = "How strips travel: jpeg (smaller; exact w.r.t. the JPEG-decoded image) or lossless."
HELP_EMBEDDED = "Run on a private Redis and local workers even if a Redis is configured."
HELP_WORKERS = "Worker processes to start in embedded mode."

app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
err = Console(stderr=True, highlight=False)
state = {"debug": False}
P = ParamSpec("P")


@app.callback()
def main(debug: Annotated[bool, typer.Option(help="Show tracebacks of errors.")] = False) -> None:
    state["debug"] = debug


@contextlib.contextmanager
def _broker(settings: Settings, force_embedded: bool, workers: int) -> Iterator[str | None]:
    """Point the app at the Redis to use for the `with` block.

    Yields None for a configured (or default, answering) Redis; in embedded mode, runs a private
    Redis and local workers for the block and yields the note to print afterwards.
    """
    if not force_embedded and (settings.broker_url_explicit or broker.answers(settings.broker_url)):
        broker.require(settings.broker_url)
        use_broker(settings.broker_url, settings.result_backend)
        yield None
        return
    with local.embedded(workers=1, concurrency=workers):
        yield (
            f"ran embedded: a private Redis and {workers} local worker process(es), now stopped. "
            "For a cluster: start Redis, run `celery -A luminagrid worker` on each node, "
            "and set LUMINAGRID_BROKER_URL=redis://HOST:6379/0 here."
        )


def _progress(total_hint: str) -> Progress:
    return Progress(
        TextColumn(total_hint), BarColumn(), MofNCompleteColumn(), TextColumn("strips"), TimeElapsedColumn(),
        console=err, transient=True, disable=not err.is_terminal,
    )


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

    return wrapper


@app.command(help=HELP_SUBMIT)
@exits
def submit(
    image: Annotated[Path, typer.Argument(help="Input image (PNG, JPEG, TIFF, BMP, WebP; 8/16-bit).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help=HELP_OUT)] = None,
    low: Annotated[float, typer.Option(help="Canny low threshold (0-2040).")] = 100.0,
    high: Annotated[float, typer.Option(help="Canny high threshold (0-2040, >= low).")] = 200.0,
    strips: Annotated[Optional[int], typer.Option(help=HELP_STRIPS)] = None,
    codec: Annotated[Codec, typer.Option(help=HELP_CODEC)] = Codec.jpeg,
    quality: Annotated[int, typer.Option(help="JPEG quality for --codec jpeg (1-100).")] = 95,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the result.")] = 600.0,
    embedded: Annotated[bool, typer.Option("--embedded", help=HELP_EMBEDDED)] = False,
    workers: Annotated[int, typer.Option(help=HELP_WORKERS)] = os.cpu_count() or 1,
) -> None:
    started = time.perf_counter()
    params = jobs.Params(low=low, high=high, strips=strips, codec=codec, quality=quality)
    params.validate()
    out = out or images.default_output(image)
    images.check_output(out, image)
    settings = Settings.from_env()
    gray = jobs.load_gray(image, settings)
    with _broker(settings, embedded, max(1, workers)) as note:
        job = jobs.submit_gray(gray, params)
        with _progress(image.name) as bar:
            task = bar.add_task("strips", total=job.strip_count)
            result = job.wait(timeout, on_progress=lambda done, _total: bar.update(task, completed=done))
        images.write_image_atomic(out, result.edges)
    served = ", ".join(f"{name} x{n}" for name, n in sorted(result.workers.items()))
    codec_text = f"jpeg q{quality}" if codec is Codec.jpeg else "lossless"
    typer.echo(
        f"{image} {job.width}x{job.height} -> {out} | {job.strip_count} strips ({codec_text}) | "
        f"served by {served} | {time.perf_counter() - started:.2f} s"
    )
    if note:
        typer.echo(note)


def _on_sigterm(*_: object) -> None:
    raise KeyboardInterrupt


def main_entry() -> None:
    """Run the app; typer itself turns usage errors into exit code 2."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    app()


if __name__ == "__main__":
    main_entry()
