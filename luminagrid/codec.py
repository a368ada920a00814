"""Bytes on the wire: strip pixels going out, bit maps coming back.

Strip codecs (8-bit gray (rows, width) or BGR (rows, width, 3)):
- ``jpeg``: baseline JPEG through OpenCV's libjpeg at a given quality; colour without chroma
  subsampling (4:4:4), so every 8x8 block decodes on its own. Lossy, but exactly reproducible:
  with 8-row-aligned strips the decoded strip equals the same rows of a decoded whole-image JPEG.
- ``lossless``: the raw bytes compressed with LZ4 (PNG costs 13-16 ms/MP to encode; LZ4 ~1.4).
  Output images of local operations travel back the same way.

Bit maps (bool, shape (rows, width)) travel as `np.packbits` along rows, then LZ4. Pending pixels
(`canny.Pending`) travel as LZ4 of their int32 indices followed by their int32 labels.
"""

from __future__ import annotations

import cv2
import lz4.frame
import numpy as np

from luminagrid.canny import Pending
from luminagrid.settings import Codec  # noqa: F401 - also `codec.Codec`


class CodecError(ValueError):
    """Bytes that do not decode to what their message declares."""


def shape_of(rows: int, width: int, channels: int) -> tuple[int, ...]:
    """Array shape of `rows` rows: (rows, width) for gray, (rows, width, channels) otherwise."""
    return (rows, width) if channels == 1 else (rows, width, channels)


def channels_of(pixels: np.ndarray) -> int:
    """1 for an (rows, width) array, else its third dimension."""
    return 1 if pixels.ndim == 2 else pixels.shape[2]


def encode_strip(pixels: np.ndarray, codec: Codec, quality: int) -> bytes:
    """Encode a (rows, width) or (rows, width, 3) uint8 array."""
    if codec is Codec.jpeg:
        flags = [cv2.IMWRITE_JPEG_QUALITY, quality]
        if pixels.ndim == 3:  # no chroma subsampling: blocks stay 8 rows high and independent
            flags += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
        ok, buf = cv2.imencode(".jpg", pixels, flags)
        if not ok:
            raise CodecError(f"OpenCV could not JPEG-encode a {pixels.shape} strip")
        return buf.tobytes()
    return lz4.frame.compress(np.ascontiguousarray(pixels).data)


#: JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic...): each carries the
#: frame's precision, height, width and component count. Not 0xC4 (DHT), 0xC8 (JPG), 0xCC (DAC).
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
#: Markers without a length field: TEM and the restart markers RST0-RST7.
_BARE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})


def jpeg_frame(data: bytes) -> tuple[int, int, int]:
    """(height, width, components) a JPEG's frame header (SOF) declares, read from its markers
    alone, so a decoder never allocates for a size nobody checked. Raises `CodecError` if `data`
    is not a JPEG or its header ends before the frame does."""
    if data[:2] != b"\xff\xd8":
        raise CodecError("JPEG strip does not start with a JPEG marker (SOI)")
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            raise CodecError(f"JPEG strip has no marker at byte {at}")
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte before a marker
            at += 1
            continue
        if marker in _BARE_MARKERS:
            at += 2
            continue
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        if marker in _SOF_MARKERS:
            if length < 8 or at + 10 > len(data):
                raise CodecError("JPEG strip's frame header is truncated")
            height = int.from_bytes(data[at + 5 : at + 7], "big")
            width = int.from_bytes(data[at + 7 : at + 9], "big")
            return height, width, data[at + 9]
        if marker in (0xD9, 0xDA) or length < 2:  # end of image, start of scan: no frame header came
            break
        at += 2 + length
    raise CodecError("JPEG strip has no frame header (SOF) before its image data")


def decode_strip(data: bytes, codec: Codec, rows: int, width: int, channels: int = 1) -> np.ndarray:
    """Decode to a uint8 array of `shape_of(rows, width, channels)`, checking the declared shape.

    A JPEG's header is compared with the shape first: a forged strip of 64 KB declaring
    15000x15000 would otherwise make OpenCV allocate 675 MB before its shape could be checked."""
    shape = shape_of(rows, width, channels)
    if codec is Codec.jpeg:
        declared = jpeg_frame(data)
        if declared != (rows, width, channels):
            raise CodecError(f"JPEG strip declares {declared[1]}x{declared[0]} pixels with {declared[2]} component(s), "
                             f"expected {width}x{rows} with {channels}")
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if pixels is None or pixels.dtype != np.uint8 or pixels.shape != shape:
            got = None if pixels is None else (pixels.shape, str(pixels.dtype))
            raise CodecError(f"JPEG strip decoded to {got}, expected {shape} uint8")
        return pixels
    return _lz4_rows(data, rows, width * channels, "lossless strip").reshape(shape)


def jpeg_roundtrip(pixels: np.ndarray, quality: int) -> np.ndarray:
    """Decode(encode(pixels)): what the workers see of a whole image in JPEG mode."""
    return decode_strip(encode_strip(pixels, Codec.jpeg, quality), Codec.jpeg, *pixels.shape[:2], channels_of(pixels))


def pack_bits(mask: np.ndarray) -> bytes:
    """Compress a (rows, width) bool/0-1 map: ~16 KB per megapixel of a typical edge map."""
    return pack_rows(np.packbits(mask, axis=1))


def pack_rows(packed: np.ndarray) -> bytes:
    """Compress an already packed map, (rows, ceil(width/8)) uint8 as `np.packbits(axis=1)` gives."""
    return lz4.frame.compress(np.ascontiguousarray(packed).data)


def unpack_rows(data: bytes, rows: int, width: int) -> np.ndarray:
    """Inverse of `pack_rows`: (rows, ceil(width/8)) uint8."""
    return _lz4_rows(data, rows, (width + 7) // 8, "bit map")


def unpack_bits(data: bytes, rows: int, width: int) -> np.ndarray:
    """Inverse of `pack_bits`: a (rows, width) bool array."""
    return np.unpackbits(unpack_rows(data, rows, width), axis=1, count=width).view(bool)


def pack_pending(pending: Pending) -> bytes | None:
    """A strip's pending pixels, or None when it has none (most strips)."""
    if not pending.at.size:
        return None
    return lz4.frame.compress(np.concatenate([pending.at, pending.label]).astype("<i4", copy=False).data)


def unpack_pending(data: bytes | None, rows: int, width: int) -> Pending:
    """Inverse of `pack_pending`, checking that every index lies inside the strip, in order."""
    if data is None:
        return Pending.none()
    raw, complete = _lz4_bounded(data, 8 * rows * width, "pending pixels")
    count = len(raw) // 8
    if not complete or len(raw) % 8 or count > rows * width:
        raise CodecError(f"pending pixels hold {len(raw)} bytes, not 8 per pixel of a {rows}x{width} strip")
    both = np.frombuffer(raw, "<i4").astype(np.int32)
    at, label = both[:count], both[count:]
    if count and (at[0] < 0 or at[-1] >= rows * width or np.any(np.diff(at) <= 0)):
        raise CodecError(f"pending pixel indices are not ascending within a {rows}x{width} strip")
    return Pending(at, label)


def pack_indices(at: np.ndarray) -> bytes:
    """Ascending pixel indices (int32) as LZ4 bytes (empty for none)."""
    return lz4.frame.compress(np.ascontiguousarray(at, np.int32).tobytes()) if at.size else b""


def unpack_indices(data: bytes, limit: int) -> np.ndarray:
    """`pack_indices`' int32 indices, each checked to lie in [0, `limit`)."""
    if not data:
        return np.zeros(0, np.int32)
    raw, _ = _lz4_bounded(data, 4 * limit, "pixel indices")
    if len(raw) % 4:
        raise CodecError(f"pixel indices hold {len(raw)} bytes, not 4 per index")
    at = np.frombuffer(raw, np.int32)
    if at.size and (at.min() < 0 or at.max() >= limit):
        raise CodecError(f"pixel indices fall outside the strip's {limit} pixels")
    return at


def _lz4_bounded(data: bytes, limit: int, what: str) -> tuple[bytes, bool]:
    """LZ4-decompress at most `limit` + 1 bytes, so a forged frame cannot balloon in memory.

    Returns the bytes and whether they are the whole frame; raises `CodecError` on invalid LZ4.
    """
    decompressor = lz4.frame.LZ4FrameDecompressor()
    try:
        raw = decompressor.decompress(data, max_length=limit + 1)
    except RuntimeError as exc:
        raise CodecError(f"{what} is not valid LZ4: {exc}") from None
    return raw, decompressor.eof


def _lz4_rows(data: bytes, rows: int, row_bytes: int, what: str) -> np.ndarray:
    """LZ4-decompress to a (rows, row_bytes) uint8 array, or raise `CodecError`."""
    expected = rows * row_bytes
    raw, complete = _lz4_bounded(data, expected, what)
    if len(raw) != expected or not complete:
        size = f"{len(raw)}" if len(raw) <= expected else f"more than {expected}"
        raise CodecError(f"{what} holds {size} bytes, expected {rows}x{row_bytes}")
    return np.frombuffer(raw, np.uint8).reshape(rows, row_bytes)
