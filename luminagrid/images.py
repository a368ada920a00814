"""Reading input images, converting them to 8-bit gray or BGR, and writing outputs atomically."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np

from luminagrid.errors import InputError, OutputError, OutputExists

#: Output formats that keep an edge map exact (JPEG would smear it).
LOSSLESS_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".pgm", ".pbm", ".webp")
#: Formats that hold one gray channel only; `.pbm` holds 1 bit per pixel (black or white).
GRAY_ONLY_SUFFIXES = (".pgm", ".pbm")
BILEVEL_SUFFIXES = (".pbm",)
#: Sample types luminagrid reads (OpenCV decodes some TIFFs to float32, float64 or int32).
SAMPLE_TYPES = (np.uint8, np.uint16)


def check_readable(path: Path) -> None:
    """Raise `InputError` unless `path` is a non-empty file we may read."""
    try:
        if not path.exists():
            raise InputError(f"{path}: no such file; check the path.")
        if path.is_dir():
            raise InputError(f"{path} is a directory; give an image file.")
        if path.stat().st_size == 0:
            raise InputError(f"{path} is empty (0 bytes); give an image file.")
        with open(path, "rb"):
            pass
    except OSError as exc:  # e.g. a folder on the way that we may not enter
        raise InputError(f"{path}: cannot read it ({exc.strerror}); check its permissions.") from None


def read_image(path: Path, max_pixels: int) -> np.ndarray:
    """Decode an image file as OpenCV does: (H, W) or (H, W, 3), uint8 or uint16.

    EXIF orientation is applied; alpha is dropped (it does not enter the gray conversion).
    """
    check_readable(path)
    with _stderr_captured() as diagnostics:
        try:
            image = cv2.imread(str(path), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
        except cv2.error as exc:
            image, error = None, _first_line(exc)
        else:
            error = ""
    said = " ".join(line.strip() for line in diagnostics[0].splitlines() if line.strip())
    if "MAX_IMAGE_PIXELS" in error:
        raise InputError(
            f"{path}: its header declares more pixels than the limit of {max_pixels} "
            "(a decompression bomb, or a huge image); raise LUMINAGRID_MAX_PIXELS if it is genuine."
        )
    if "libpng error" in said:
        raise InputError(f"{path}: the PNG is damaged or truncated ({said}); use a complete file.")
    if image is None:
        detail = f" ({said or error})" if said or error else ""
        raise InputError(f"{path}: not a readable image{detail}; use PNG, JPEG, TIFF, BMP or WebP.")
    if "Premature end of JPEG file" in said:
        raise InputError(f"{path}: the JPEG is truncated ({said}); use a complete file.")
    check_pixels(image, max_pixels, str(path))
    check_samples(image, str(path))
    return image


def check_samples(image: np.ndarray, name: str) -> None:
    """Raise `InputError` unless `image` has 8- or 16-bit unsigned samples (what the operations take)."""
    if image.dtype.type not in SAMPLE_TYPES:
        kind = "floating-point" if image.dtype.kind == "f" else "integer" if image.dtype.kind in "iu" else "other"
        raise InputError(
            f"{name}: its samples are {image.dtype} ({kind}); luminagrid reads 8- and 16-bit images "
            "(uint8, uint16): convert it, e.g. to a 16-bit PNG or TIFF."
        )


@contextlib.contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """Capture what C libraries (libjpeg, libpng) print on file descriptor 2 meanwhile.

    libjpeg reports a truncated file only as a warning there; it also keeps their noise off the
    user's terminal. Yields a list that holds the text once the block is left.
    """
    captured: list[str] = [""]
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured[0] = sink.read(64 * 1024).decode(errors="replace")


def check_pixels(image: np.ndarray, max_pixels: int, name: str) -> None:
    height, width = image.shape[:2]
    if height * width > max_pixels:
        raise InputError(
            f"{name} has {width}x{height} = {height * width} pixels, over the limit of {max_pixels}; "
            "raise LUMINAGRID_MAX_PIXELS if it is genuine."
        )


def to_8bit(image: np.ndarray) -> np.ndarray:
    """The same image with 8-bit samples: 16-bit samples keep their high byte (`value >> 8`)."""
    if image.dtype == np.uint16:
        return (image >> 8).astype(np.uint8)
    if image.dtype != np.uint8:
        raise InputError(f"images of type {image.dtype} are not supported; use 8- or 16-bit images.")
    return image


def to_gray8(image: np.ndarray) -> np.ndarray:
    """(H, W) uint8 gray of an image array.

    16-bit samples keep their high byte (`to_8bit`), then colour becomes gray with
    `cv2.COLOR_BGR2GRAY` (BGRA: `COLOR_BGRA2GRAY`, which ignores alpha).
    """
    image = to_8bit(image)
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
    raise InputError(f"an image of shape {image.shape} is not gray, BGR or BGRA.")


def to_bgr8(image: np.ndarray) -> np.ndarray:
    """8-bit (H, W) gray for a gray image, (H, W, 3) BGR for a colour one (alpha dropped)."""
    image = to_8bit(image)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    return to_gray8(image)


def default_output(input_path: Path, suffix: str = "edges", folder: Path | None = None) -> Path:
    """`photo.jpg` -> `photo.edges.png` (the operation's suffix), beside the input or in `folder`."""
    return (folder or input_path.parent) / f"{input_path.stem}.{suffix}.png"


def check_output(out: Path, input_path: Path | None = None) -> None:
    """Fail before any work is done if `out` cannot be written."""
    if out.suffix.lower() not in LOSSLESS_SUFFIXES:
        raise OutputError(
            f"{out}: output format {out.suffix or '(none)'!r} is not lossless; "
            f"use one of {', '.join(LOSSLESS_SUFFIXES)}."
        )
    if input_path is not None and out.resolve() == input_path.resolve():
        raise OutputError(f"{out} is the input file; choose another output path with -o.")
    if out.is_dir():
        raise OutputError(f"{out} is a directory; give a file name with -o.")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{parent}: output folder does not exist; create it or choose another -o.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{parent}: output folder is not writable; choose another -o.")


def check_format(out: Path, channels: int, bilevel: bool, op: str) -> None:
    """Fail before any work if `out`'s format cannot hold the output exactly: `channels` (1 gray,
    3 colour) of it, `bilevel` if its pixels are only 0 and 255 (Canny's), made by `op`."""
    suffix = out.suffix.lower()
    if suffix in GRAY_ONLY_SUFFIXES and channels != 1:
        raise OutputError(
            f"{out}: {suffix} holds gray images only, but --op {op} on a colour image gives colour; "
            "use .png or .tif (or a gray input)."
        )
    if suffix in BILEVEL_SUFFIXES and not bilevel:
        raise OutputError(
            f"{out}: {suffix} holds 1 bit per pixel (black or white), but --op {op} gives gray levels, "
            "which it would round off; use .png, .tif or .pgm."
        )


def write_image_atomic(out: Path, image: np.ndarray, overwrite: bool = True) -> None:
    """Encode by `out`'s suffix and write via a temp file + rename: never a partial file.

    Unless `overwrite`, raise `OutputExists` rather than replace an existing `out`."""
    ok, buf = cv2.imencode(out.suffix.lower(), image)
    if not ok:
        raise OutputError(f"{out}: OpenCV could not encode the result as {out.suffix}.")
    _atomic(out, lambda f: f.write(buf.data), overwrite)


def exists_error(out: Path) -> OutputExists:
    return OutputExists(f"{out} exists already; pass --force to overwrite it, or choose another path with -o.")


def _place(tmp: str, out: Path, overwrite: bool) -> None:
    """Rename `tmp` to `out`; unless `overwrite`, never over a file (even one made meanwhile)."""
    if overwrite:
        os.replace(tmp, out)
        return
    try:
        os.link(tmp, out)  # fails if `out` exists, atomically
    except FileExistsError:
        raise exists_error(out) from None
    except OSError:  # a file system without hard links
        if out.exists():
            raise exists_error(out) from None
        os.replace(tmp, out)
        return
    os.unlink(tmp)


def _atomic(out: Path, write: Callable[[BinaryIO], object], overwrite: bool = True) -> None:
    """Run `write` on a temp file beside `out`, then rename it to `out`; on any error, remove it."""
    parent = out.parent if str(out.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{out.name}.", suffix=".tmp")
    except OSError as exc:
        raise OutputError(f"{out}: cannot write there ({exc.strerror}); choose another -o.") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        _place(tmp, out, overwrite)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"{out}: could not write ({exc.strerror}); choose another -o.") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bilevel_png_atomic(out: Path, rows: Iterator[np.ndarray], width: int, height: int,
                             overwrite: bool = True) -> None:
    """Write a 1-bit gray PNG (reads back as 0/255) from blocks of packed rows (np.packbits
    layout: MSB first, a set bit is white), as they come: the image is never whole in memory.

    Atomic as `write_image_atomic`: a temp file beside `out`, then a rename; nothing left on error.
    """
    import png  # noqa: PLC0415 - pypng: only this writer needs it

    def packed_rows() -> Iterator[bytes]:
        for block in rows:
            yield from (row.tobytes() for row in block)

    writer = png.Writer(width, height, greyscale=True, bitdepth=1, compression=1)
    _atomic(out, lambda f: writer.write_packed(f, packed_rows()), overwrite)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1].strip() if text else type(exc).__name__
