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
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from luminagrid import images
from luminagrid.errors import InputError
from luminagrid.strips import Strip

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


def _streamed(source: Source, plan: list[Strip]) -> Iterator[tuple[Strip, np.ndarray]]:
    import pyvips  # noqa: PLC0415

    region = pyvips.Region.new(source._vips)
    held: np.ndarray | None = None  # decoded rows held_from:read_to (what the next strip may reuse)
    held_from = read_to = 0
    for s in plan:  # strips tile the image in order and overlap only by halos: s.top <= read_to
        if s.bottom > read_to:
            try:
                data = region.fetch(0, read_to, source.width, s.bottom - read_to)
            except pyvips.Error as exc:
                raise InputError(_mid_stream(source, read_to, exc)) from None
            fresh = _as_opencv(data, s.bottom - read_to, source.width, source.dtype, source._vips.bands)
            reused = held[s.top - held_from:] if held is not None else fresh[:0]
            held = np.concatenate([reused, fresh]) if len(reused) else fresh
            held_from, read_to = s.top, s.bottom
        assert held is not None
        yield s, held[s.top - held_from:s.bottom - held_from]


def _mid_stream(source: Source, row: int, exc: Exception) -> str:
    """What to say when decoding fails part-way (libvips' own words name its internals, not the file)."""
    kind = STREAMED.get(str(source._vips.get("vips-loader")), "image")
    return (f"{source.path}: the {kind} is damaged or truncated: it could not be decoded past row {row} of "
            f"{source.height}; use a complete file.")
