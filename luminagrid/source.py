"""An input image read top to bottom, a band of rows at a time, as OpenCV would decode it.

    source = open_source(Path("scan.png"), max_pixels)
    for s, rows in source.bands(plan):   # strips in order; rows = source rows s.top:s.bottom
        ...

PNG, JPEG and TIFF are streamed with libvips (`pyvips`, sequential access): the first rows are
at hand after milliseconds, and only a strip plus its halos is ever held. Their pixels equal
`cv2.imread(path, IMREAD_ANYDEPTH | IMREAD_ANYCOLOR)`'s: 8- or 16-bit, gray, or BGR (libvips'
RGB reversed; alpha dropped; gray with alpha as three equal channels, as OpenCV gives it). The
tests compare every format. Where streaming could not be exact, the image is decoded whole with
OpenCV instead (`images.read_image`) and `Source.whole_because` says why: EXIF orientation other
than 1 (OpenCV rotates), interlaced PNG, CMYK or other colour spaces, other sample formats, and
formats libvips does not stream (WebP, BMP, PNM, ...). Decoding errors found mid-stream (a
truncated file) raise `InputError` from `bands`.

How an image travels is decided here too, from its header: `plan_for` gives its strips, and
`sends_file` whether a small one goes whole as its file, which its worker reads with
`decode_file` (the same libvips path, so the same pixels). `ReadAhead` decodes the strips in a
thread of its own, a bounded number ahead of whoever sends them.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from luminagrid import images, strips
from luminagrid.errors import InputError
from luminagrid.stages import Stages
from luminagrid.strips import Strip

if TYPE_CHECKING:
    from luminagrid.params import Params

#: libvips loaders whose sequential read gives OpenCV's pixels exactly.
STREAMED = {"pngload": "PNG", "jpegload": "JPEG", "tiffload": "TIFF"}
_FORMATS = {"uchar": np.uint8, "ushort": np.uint16}
_INTERPRETATIONS = {"b-w", "srgb", "grey16", "rgb16", "multiband"}


@dataclass
class Source:
    """An image being read. `channels` and `dtype` are those of the decoded pixels (1 or 3)."""

    path: Path | None
    height: int
    width: int
    channels: int
    dtype: type
    #: None when streamed; else why the image is decoded whole
    whole_because: str | None = None
    _array: np.ndarray | None = None
    _vips: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    #: the thread decoding it ahead, once `read_ahead` started one
    reader: ReadAhead | None = None

    @property
    def streamed(self) -> bool:
        return self._vips is not None

    def bands(self, plan: list[Strip]) -> Iterator[tuple[Strip, np.ndarray]]:
        """Each strip of `plan` (top to bottom) with its rows `top:bottom`, each row decoded once."""
        if self._vips is None:
            assert self._array is not None
            for s in plan:
                yield s, self._array[s.top:s.bottom]
            return
        yield from _streamed(self, plan)

    def read_ahead(self, plan: list[Strip], stages: Stages) -> ReadAhead:
        """Start decoding `plan`'s strips now, in a thread (`ReadAhead`); whoever sends them takes
        them from `reader`. The command line starts it before its heavy imports."""
        if self.reader is None or self.reader.plan != plan:
            if self.reader is not None:
                self.reader.close()
            self.reader = ReadAhead(self, plan, stages)
        return self.reader


#: Most bytes of decoded strips read ahead of the one being sent, and the fewest strips: enough
#: to keep decoding while the command line imports Celery (~0.3 s), bounded so that memory
#: follows the strips in flight, not the image.
READ_AHEAD_BYTES = 64 * 1024 * 1024
READ_AHEAD_MIN = 2


class ReadAhead:
    """`src.bands(plan)`, decoded in a thread of its own, a bounded number of strips ahead of
    the consumer (rows already in memory are handed out directly: a thread would only cost GIL
    hand-overs). Iterate once; `close()` stops the thread (a strip still decoding finishes alone)."""

    def __init__(self, src: Source, plan: list[Strip], stages: Stages) -> None:
        self.src, self.plan, self.stages = src, plan, stages
        strip_bytes = max((s.bottom - s.top) * src.width * src.channels * np.dtype(src.dtype).itemsize for s in plan)
        self.ahead = max(READ_AHEAD_MIN, READ_AHEAD_BYTES // max(1, strip_bytes))
        self.handoff: queue.Queue[object] = queue.Queue(maxsize=self.ahead)
        self.stop = threading.Event()
        self.done = object()
        self.thread: threading.Thread | None = None
        if src.streamed:
            self.thread = threading.Thread(target=self._read, name="luminagrid-read", daemon=True)
            self.thread.start()

    def _hand_over(self, item: object) -> None:
        """Into the queue, waiting while it is full, unless the consumer stopped."""
        while not self.stop.is_set():
            try:
                self.handoff.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _read(self) -> None:
        try:
            bands = self.src.bands(self.plan)
            while not self.stop.is_set():
                started = time.perf_counter()
                item = next(bands, self.done)
                self.stages.add("read", time.perf_counter() - started)
                if item is not self.done:
                    self.stages.log("read", item[0].row1)  # type: ignore[index]
                self._hand_over(item)
                if item is self.done:
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, unless it stopped
            self._hand_over(exc)

    def __iter__(self) -> Iterator[tuple[Strip, np.ndarray]]:
        if self.thread is None:
            for s, rows in self.src.bands(self.plan):
                self.stages.log("read", s.row1)
                yield s, rows
            return
        while True:
            item = self.handoff.get()
            if item is self.done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(2)  # a strip still decoding finishes alone (a daemon thread); do not hold up a cancel


#: A small image's file is at most this many bytes per pixel (twice 16-bit RGBA's raw samples),
#: plus `FILE_SLACK_BYTES` (headers, metadata).
FILE_BYTES_PER_PIXEL = 16
FILE_SLACK_BYTES = 64 * 1024


def file_limit(width: int, height: int) -> int:
    """Most bytes a file sent whole (`sends_file`) may take."""
    return FILE_BYTES_PER_PIXEL * width * height + FILE_SLACK_BYTES


def sends_file(src: Source, params: Params) -> bool:
    """Whether to send the image as its file, to one worker that decodes it: a streamable file
    of at most one strip's pixels (where a batch's parallelism comes from its many images, and
    the submitter's decoding was most of the work). Its pixels are the same either way."""
    if not (src.streamed and src.path is not None and params.strips in (None, 1)):
        return False
    if src.height * src.width > params.operation.strip_pixels:
        return False
    try:
        return src.path.stat().st_size <= file_limit(src.width, src.height)
    except OSError:
        return False


def plan_for(src: Source, params: Params) -> tuple[bool, list[Strip]]:
    """Whether `src` goes as its file (`sends_file`), and its strips, from its header alone."""
    op = params.operation
    file = sends_file(src, params)
    if file or (params.strips is None and src.height * src.width <= op.one_strip_pixels):
        count = 1
    else:
        count = params.strips or strips.default_strip_count(src.height, src.width, op.strip_pixels)
    return file, strips.plan_strips(src.height, count, strips.halo_for(op.halo_rows(params.values)))


def open_source(path: Path, max_pixels: int) -> Source:
    """Open `path` for reading: streamed if it can be exact, else decoded whole now.

    Raises `InputError` as `images.read_image` does (missing, empty, unreadable, over the pixel
    limit: checked from the header, before any pixel is decoded)."""
    images.check_readable(path)
    vips, why = _open_vips(path)
    if vips is None:
        image = images.read_image(path, max_pixels)
        height, width = image.shape[:2]
        return Source(path, height, width, 1 if image.ndim == 2 else image.shape[2], image.dtype.type,
                      whole_because=why, _array=image)
    height, width = vips.height, vips.width
    if height * width > max_pixels:
        raise InputError(
            f"{path}: its header declares more pixels than the limit of {max_pixels} "
            "(a decompression bomb, or a huge image); raise LUMINAGRID_MAX_PIXELS if it is genuine."
        )
    channels = 1 if vips.bands == 1 else 3  # gray; or BGR (alpha dropped, gray+alpha as 3 equal)
    return Source(path, height, width, channels, _FORMATS[vips.format], _vips=vips)


def from_array(image: np.ndarray) -> Source:
    """An array already in memory, as a source (`bands` yields views of it)."""
    height, width = image.shape[:2]
    return Source(None, height, width, 1 if image.ndim == 2 else image.shape[2], image.dtype.type,
                  whole_because="an array in memory", _array=image)


def _open_vips(path: Path) -> tuple[Any, str | None]:
    """A libvips image in sequential access if streaming it is exact, else (None, why not)."""
    try:
        import pyvips  # noqa: PLC0415 - only the reading submitter needs libvips

        pyvips.cache_set_max(0)  # nothing to reuse: each image is read once, top to bottom
    except (ImportError, OSError) as exc:
        return None, f"libvips is not available ({exc})"
    try:
        image = pyvips.Image.new_from_file(str(path), access="sequential", fail_on="truncated")
        why = _not_exact(image)
    except pyvips.Error:
        return None, "libvips cannot read this format"
    return (None, why) if why else (image, None)


def _not_exact(image: Any) -> str | None:
    """Why libvips' pixels of `image` (opened, header read) would not be OpenCV's, or None."""
    loader = str(image.get("vips-loader")).removesuffix("_buffer")  # pngload_buffer reads bytes alike
    fields = set(image.get_fields())
    if loader not in STREAMED:
        return f"libvips reads it with {loader}, which does not stream"
    if "orientation" in fields and int(image.get("orientation")) != 1:
        return f"its EXIF orientation is {int(image.get('orientation'))} (OpenCV rotates it)"
    if loader == "pngload" and "interlaced" in fields and int(image.get("interlaced")):
        return "it is an interlaced PNG"
    if loader == "tiffload" and "n-pages" in fields and int(image.get("n-pages")) > 1:
        return "it is a multi-page TIFF"
    if image.format not in _FORMATS or image.bands not in (1, 2, 3, 4) or image.interpretation not in _INTERPRETATIONS:
        return f"its samples are {image.format} x {image.bands} ({image.interpretation})"
    return None


def decode_file(data: bytes, width: int, height: int) -> np.ndarray:
    """A whole image file's bytes (a streamable PNG, JPEG or TIFF: `Source.streamed`), decoded
    by libvips exactly as `Source.bands` would: (height, width) or (height, width, 3), uint8 or
    uint16. This is how a worker reads a small image sent to it as its file (`publish`).

    The header must declare `width` x `height` (checked before any pixel is decoded); raises
    `InputError` saying what is wrong with the file.
    """
    import pyvips  # noqa: PLC0415

    pyvips.cache_set_max(0)
    try:
        image = pyvips.Image.new_from_buffer(data, "", access="sequential", fail_on="truncated")
    except pyvips.Error:
        raise InputError("not a readable image; use PNG, JPEG, TIFF, BMP or WebP.") from None
    why = _not_exact(image)
    if why or (image.width, image.height) != (width, height):
        raise InputError(f"the file is not the image its job describes ({why or f'{image.width}x{image.height}'}, "
                         f"not a streamable {width}x{height}); submit it again.")
    try:
        pixels = image.write_to_memory()
    except pyvips.Error:
        kind = STREAMED[str(image.get("vips-loader")).removesuffix("_buffer")]
        raise InputError(f"the {kind} is damaged or truncated: it could not be decoded; use a complete file.") from None
    return _as_opencv(pixels, height, width, _FORMATS[image.format], image.bands)


def _as_opencv(data: bytes, rows: int, width: int, dtype: type, bands: int) -> np.ndarray:
    """libvips' interleaved RGB(A) or gray(+alpha) rows as OpenCV decodes them."""
    pixels = np.frombuffer(data, dtype).reshape(rows, width, bands)
    if bands == 1:
        return pixels[:, :, 0]
    if bands == 2:  # gray with alpha: OpenCV gives three equal channels
        return cv2.cvtColor(np.ascontiguousarray(pixels[:, :, 0]), cv2.COLOR_GRAY2BGR)
    # RGB(A) -> BGR: OpenCV's own channel swap is many times faster than a reversed numpy copy
    return cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR if bands == 3 else cv2.COLOR_RGBA2BGR)


#: Rows libvips decodes per request: its sequential reader caches about as much as it is asked
#: for at once, several times over (an 8K BGR strip of 448 rows in one request: +169 MB peak).
FETCH_ROWS = 64


def _streamed(source: Source, plan: list[Strip]) -> Iterator[tuple[Strip, np.ndarray]]:
    import pyvips  # noqa: PLC0415

    region = pyvips.Region.new(source._vips)
    bands = source._vips.bands
    held: np.ndarray | None = None  # decoded rows held_from:read_to (what the next strip may reuse)
    held_from = read_to = 0
    for s in plan:  # strips tile the image in order and overlap only by halos: s.top <= read_to
        if s.bottom > read_to:
            assert s.top <= read_to, (s, read_to)
            rows = np.empty((s.bottom - s.top, source.width, *(() if bands == 1 else (3,))), source.dtype)
            kept = read_to - s.top  # rows of the strip before decoded already (its halo above)
            if kept > 0 and held is not None:
                rows[:kept] = held[s.top - held_from:]
            for row in range(read_to, s.bottom, FETCH_ROWS):
                count = min(FETCH_ROWS, s.bottom - row)
                try:
                    data = region.fetch(0, row, source.width, count)
                except pyvips.Error as exc:
                    raise InputError(_mid_stream(source, row, exc)) from None
                rows[row - s.top:row - s.top + count] = _as_opencv(data, count, source.width, source.dtype, bands)
            held, held_from, read_to = rows, s.top, s.bottom
        assert held is not None
        yield s, held[s.top - held_from:s.bottom - held_from]


def _mid_stream(source: Source, row: int, exc: Exception) -> str:
    """What to say when decoding fails part-way (libvips' own words name its internals, not the file)."""
    kind = STREAMED.get(str(source._vips.get("vips-loader")), "image")
    return (f"{source.path}: the {kind} is damaged or truncated: it could not be decoded past row {row} of "
            f"{source.height}; use a complete file.")
