"""The pure core, in process: strip-parallel Canny equals whole-image Canny; codecs round-trip."""

from __future__ import annotations

import cv2
import lz4.frame
import numpy as np
import pytest
from conftest import forged_jpeg, synthetic
from hypothesis import given, settings
from hypothesis import strategies as st

from luminagrid import codec
from luminagrid.canny import (
    Pending,
    Seams,
    canny_reference,
    canny_strip,
    finish_seams,
    on_seam_rows,
    pixels_of,
    set_edges,
)
from luminagrid.codec import Codec, CodecError
from luminagrid.strips import plan_strips


def strip_parallel(gray: np.ndarray, count: int, low: float, high: float, seams: bool = True) -> np.ndarray:
    height, width = gray.shape
    plan = plan_strips(height, count, 8)
    parts = [canny_strip(gray[s.top:s.bottom], s.halo_top, s.halo_bottom, low, high,
                         s.index > 0, s.index < len(plan) - 1) for s in plan]
    packed = [np.packbits(p.edges, axis=1) for p in parts]
    if seams:
        seams = [Seams(s.row1 - s.row0, on_seam_rows(p.pending, s.row1 - s.row0, width),
                       np.packbits(p.edges[0]), np.packbits(p.edges[-1]))
                 for s, p in zip(plan, parts)]
        for rows, p, labels in zip(packed, parts, finish_seams(width, seams)):
            set_edges(rows, pixels_of(p.pending, labels), width)
    return np.unpackbits(np.vstack(packed), axis=1, count=width).view(bool)


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1), height=st.integers(1, 300), width=st.integers(1, 300),
    count=st.integers(1, 50), low=st.floats(0, 300), span=st.floats(0, 300),
)
def test_strip_parallel_canny_equals_whole_image_canny(
    seed: int, height: int, width: int, count: int, low: float, span: float,
) -> None:
    assert_exact(synthetic(seed, height, width), count, low, low + span)


def assert_exact(gray: np.ndarray, count: int, low: float, high: float) -> None:
    assert np.array_equal(strip_parallel(gray, count, low, high), canny_reference(gray, low, high))


def test_without_the_seam_pass_strips_would_miss_edges() -> None:
    # Guards the test above: hysteresis really does cross seams on this image.
    gray = synthetic(7, 600, 400)
    reference = canny_reference(gray, 20, 120)
    assert np.array_equal(strip_parallel(gray, 12, 20, 120), reference)
    assert not np.array_equal(strip_parallel(gray, 12, 20, 120, seams=False), reference)


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1), height=st.integers(120, 700), width=st.integers(1, 400),
    count=st.integers(2, 5), low=st.floats(0, 80), span=st.floats(0, 300),
)
def test_tall_strips_follow_weak_chains_far_from_the_seam(
    seed: int, height: int, width: int, count: int, low: float, span: float,
) -> None:
    # Tall strips and low thresholds: weak components reach past the first band beside each seam,
    # where the strip step follows them in the columns they reach (canny._beside_seam).
    assert_exact(synthetic(seed, height, width), count, low, low + span)


def test_a_weak_line_far_into_a_strip_is_followed_to_its_end() -> None:
    # A faint vertical edge, weak everywhere (gradient between the thresholds), from row 40 across
    # the seam at row 256; beyond the upper strip's halo it turns strong: the whole faint edge is
    # an edge, though the upper strip alone sees no strong pixel on it.
    gray = np.full((512, 300), 100, np.uint8)
    gray[40:300, 150:] = 110  # a step of 10: L1 Sobel magnitude 40
    gray[272:400, 150:] = 200  # a step of 100 from row 272: strong
    low, high = 30, 200
    reference = canny_reference(gray, low, high)
    assert reference[40:256].any()
    plan = plan_strips(512, 2, 8)
    upper = plan[0]
    part = canny_strip(gray[upper.top:upper.bottom], upper.halo_top, upper.halo_bottom, low, high,
                       seam_above=False, seam_below=True)
    assert not part.edges[50:200].any()  # alone, the strip has no strong pixel on the faint line
    assert (part.pending.at // 300).min() < 100  # its pending component goes far from the seam
    assert np.array_equal(strip_parallel(gray, 2, low, high), reference)


@given(seed=st.integers(0, 1000), height=st.integers(1, 120), width=st.integers(1, 120),
       quality=st.integers(1, 100), count=st.integers(1, 20))
def test_jpeg_strips_decode_to_the_rows_of_a_whole_image_jpeg(
    seed: int, height: int, width: int, quality: int, count: int,
) -> None:
    gray = synthetic(seed, height, width)
    whole = codec.jpeg_roundtrip(gray, quality)
    for s in plan_strips(height, count, 8):
        data = codec.encode_strip(gray[s.top:s.bottom], Codec.jpeg, quality)
        assert np.array_equal(codec.decode_strip(data, Codec.jpeg, s.bottom - s.top, width), whole[s.top:s.bottom])


def test_jpeg_strips_off_the_8_row_grid_would_not_be_exact() -> None:
    gray = synthetic(3, 64, 64)
    whole = codec.jpeg_roundtrip(gray, 90)
    assert not np.array_equal(codec.jpeg_roundtrip(gray[4:36], 90), whole[4:36])


@given(height=st.integers(1, 40), width=st.integers(1, 70), seed=st.integers(0, 100))
def test_lossless_strips_and_bit_maps_round_trip(height: int, width: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    gray = rng.integers(0, 256, (height, width), dtype=np.uint8)
    assert np.array_equal(codec.decode_strip(codec.encode_strip(gray, Codec.lossless, 0), Codec.lossless, height, width), gray)
    mask = rng.random((height, width)) < 0.3
    assert np.array_equal(codec.unpack_bits(codec.pack_bits(mask), height, width), mask)


@pytest.mark.parametrize("kind", list(Codec))
def test_bytes_that_do_not_match_their_declared_shape_are_refused(kind: Codec) -> None:
    data = codec.encode_strip(np.zeros((16, 16), np.uint8), kind, 90)
    with pytest.raises(CodecError, match="expected"):
        codec.decode_strip(data, kind, 16, 17)
    with pytest.raises(CodecError):
        codec.decode_strip(b"\x00garbage", kind, 16, 16)


def test_a_jpeg_strip_declaring_another_size_is_refused_before_a_pixel_is_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    gray, bgr = synthetic(7, 24, 40), synthetic(8, 24, 40, 3)
    assert codec.jpeg_frame(codec.encode_strip(gray, Codec.jpeg, 90)) == (24, 40, 1)
    assert codec.jpeg_frame(codec.encode_strip(bgr, Codec.jpeg, 90)) == (24, 40, 3)
    ok, progressive = cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])  # SOF2, not SOF0
    assert ok and codec.jpeg_frame(progressive.tobytes()) == (24, 40, 1)

    # The forged strip: 64 KB declaring 15000x15000 (OpenCV would allocate 225 MP first).
    bomb = forged_jpeg(15000, 15000, pad_bytes=64 * 1024 - 400)
    def decoding(*_: object) -> None:
        raise AssertionError("cv2.imdecode ran on a strip whose header was not checked")
    monkeypatch.setattr(codec.cv2, "imdecode", decoding)
    with pytest.raises(CodecError, match=r"declares 15000x15000 pixels with 1 component\(s\), expected 16x16 with 1"):
        codec.decode_strip(bomb, Codec.jpeg, 16, 16)
    with pytest.raises(CodecError, match="declares 40x24 pixels with 3 component"):
        codec.decode_strip(codec.encode_strip(bgr, Codec.jpeg, 90), Codec.jpeg, 24, 40, 1)
    for junk, why in ((b"\x89PNG\r\n\x1a\n", "does not start"), (bomb[:600], "no frame header"),
                      (forged_jpeg(16, 16)[:30], "no frame header"), (b"\xff\xd8\x00\x00\x00\x00", "no marker at byte 2")):
        with pytest.raises(CodecError, match=why):
            codec.jpeg_frame(junk)


def test_pending_pixels_round_trip_and_forged_ones_are_refused() -> None:
    at, label = np.array([0, 5, 17, 39], np.int32), np.array([3, 3, 9, 1], np.int32)
    back = codec.unpack_pending(codec.pack_pending(Pending(at, label)), 4, 10)
    assert np.array_equal(back.at, at) and np.array_equal(back.label, label)
    assert codec.pack_pending(Pending.none()) is None and codec.unpack_pending(None, 4, 10).at.size == 0
    with pytest.raises(CodecError, match="not ascending within a 4x10 strip"):
        codec.unpack_pending(codec.pack_pending(Pending(np.array([0, 40], np.int32), label[:2])), 4, 10)
    with pytest.raises(CodecError, match="not ascending"):
        codec.unpack_pending(codec.pack_pending(Pending(np.array([5, 5], np.int32), label[:2])), 4, 10)
    with pytest.raises(CodecError, match="8 per pixel"):
        codec.unpack_pending(lz4.frame.compress(b"\0" * 12), 4, 10)


def test_16_bit_and_colour_images_become_8_bit_gray_as_documented() -> None:
    from luminagrid.images import to_gray8

    bgr16 = synthetic(1, 20, 30, channels=3, depth=np.uint16)
    expected = cv2.cvtColor((bgr16 >> 8).astype(np.uint8), cv2.COLOR_BGR2GRAY)
    assert np.array_equal(to_gray8(bgr16), expected)
    bgra = synthetic(2, 20, 30, channels=4)
    assert np.array_equal(to_gray8(bgra), cv2.cvtColor(bgra[:, :, :3], cv2.COLOR_BGR2GRAY))
