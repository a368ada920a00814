"""The operation registry, in process: every operation's strip path equals its whole-image call."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from conftest import bilateral_filter, synthetic
from hypothesis import given, settings
from hypothesis import strategies as st

from luminagrid import codec, exactness, ops, strips
from luminagrid.codec import Codec
from luminagrid.errors import InputError

def values_of(op: ops.Operation) -> st.SearchStrategy[dict]:
    """Any parameters `op` accepts, across the whole range of each (odd ones odd, every choice)."""
    def one(p: ops.Param) -> st.SearchStrategy:
        if p.kind is str:
            return st.sampled_from(p.choices)
        if p.kind is int:
            lo, hi = p.ends[0], p.ends[-1]
            return st.integers(0, (int(hi) - int(lo)) // 2).map(lambda i: int(lo) + 2 * i) if p.odd else st.integers(int(lo), int(hi))
        return st.floats(p.lo, p.hi)

    def valid(values: dict) -> bool:
        try:
            op.values(values)
        except InputError:
            return False
        return True
    return st.fixed_dictionaries({p.name: one(p) for p in op.params}).filter(valid)


#: Parameters per operation, each across its whole range (sigma to 50, d to 31, every window).
PARAMS = {name: values_of(op) for name, op in ops.REGISTRY.items()}


def distributed_in_process(op: ops.Operation, pixels: np.ndarray, count: int, values: ops.Values) -> np.ndarray:
    """What the workers and the stitch compute, without Celery, on the cluster's 8-row grid."""
    return exactness.distributed(op, pixels, count, strips.halo_for(op.halo_rows(values)), values, strips.ALIGN_ROWS)


@pytest.mark.parametrize("name", list(ops.REGISTRY))
@settings(max_examples=100, deadline=None)
@given(data=st.data(), height=st.integers(1, 120), width=st.integers(1, 90), channels=st.sampled_from([1, 3]),
       count=st.integers(1, 16))
def test_every_operation_on_strips_equals_the_whole_image_call(
    name: str, data: st.DataObject, height: int, width: int, channels: int, count: int
) -> None:
    op = ops.get(name)
    values = op.values(data.draw(PARAMS[name]))
    pixels = op.prepare(synthetic(data.draw(st.integers(0, 2**31)), height, width, channels))
    assert np.array_equal(distributed_in_process(op, pixels, count, values), op.apply(pixels, values))


def test_operations_compute_in_colour_where_they_can_and_canny_in_gray() -> None:
    image = synthetic(3, 40, 30, channels=3)
    assert ops.get("canny").prepare(image).shape == (40, 30)
    for name in ("gaussian", "bilateral", "denoise"):
        out = distributed_in_process(ops.get(name), ops.get(name).prepare(image), 3, ops.get(name).values({}))
        assert out.shape == (40, 30, 3)


@pytest.mark.parametrize(
    ("name", "values", "call"),
    [
        ("canny", {"low": 30, "high": 90}, lambda a: cv2.Canny(a, 30, 90)),
        ("gaussian", {"sigma": 2.5}, lambda a: cv2.GaussianBlur(a, (0, 0), 2.5)),
        ("bilateral", {"d": 9, "sigma_color": 75, "sigma_space": 75}, lambda a: bilateral_filter(a, 9, 75, 75)),
        ("denoise", {"h": 10}, lambda a: cv2.fastNlMeansDenoising(a, None, 10, 7, 21) if a.ndim == 2
         else cv2.fastNlMeansDenoisingColored(a, None, 10, 10, 7, 21)),
    ],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_each_operation_is_the_opencv_call_it_names(name: str, values: dict, call, channels: int) -> None:
    op = ops.get(name)
    pixels = op.prepare(synthetic(11, 97, 83, channels))
    assert np.array_equal(distributed_in_process(op, pixels, 5, op.values(values)), call(pixels))


@pytest.mark.parametrize("name", ["gaussian", "bilateral", "denoise"])
def test_a_halo_one_row_short_of_the_declared_one_would_leave_seams(name: str) -> None:
    """Guard: the declared halos are needed, so the equality tests above can fail."""
    op = ops.get(name)
    values = op.values({"sigma": 3.0} if name == "gaussian" else {})
    pixels = op.prepare(synthetic(1, 203, 157, 3))
    # Gaussian's outermost taps round to 0 in OpenCV's fixed point, so the test cuts deeper there.
    halo = op.halo_rows(values) - 1 if name != "gaussian" else op.halo_rows(values) - 3
    whole = op.apply(pixels, values)
    seams = 0
    for cut in range(32, 180, 16):
        top = op.apply(pixels[: cut + halo], values)[:cut]
        bottom = op.apply(pixels[cut - halo:], values)[halo:]
        seams += not np.array_equal(np.concatenate([top, bottom]), whole)
    assert seams > 0


def test_colour_jpeg_strips_decode_to_the_rows_of_the_whole_image_jpeg() -> None:
    """Colour JPEG is 4:4:4, so strips on the 8-row grid decode exactly like the whole image."""
    image = synthetic(8, 203, 157, channels=3)
    whole = codec.jpeg_roundtrip(image, 90)
    plan = strips.plan_strips(203, 7, 8)
    parts = [codec.decode_strip(codec.encode_strip(image[s.top:s.bottom], Codec.jpeg, 90), Codec.jpeg,
                                s.bottom - s.top, 157, 3)[s.halo_top:s.bottom - s.top - s.halo_bottom] for s in plan]
    assert np.array_equal(np.concatenate(parts), whole)


@pytest.mark.parametrize(
    ("name", "given", "message"),
    [
        ("bilateral", {"sigma": "2"}, "--op bilateral has no parameter 'sigma'; its parameters are: d, sigma_color, sigma_space."),
        ("bilateral", {"d": "nine"}, "--op bilateral: parameter d='nine' is not a whole number; use a whole number from 1 to 31"),
        ("bilateral", {"d": "40"}, "--op bilateral: parameter d='40' is out of range; use a whole number from 1 to 31"),
        ("denoise", {"search_window": "20"}, "parameter search_window='20' is out of range; use an odd whole number from 1 to 35"),
        ("gaussian", {"sigma": "nan"}, "parameter sigma='nan' is out of range; use a number from 0.1 to 50"),
        ("gaussian", {"sigma": 10**400}, "is not a number; use a number from 0.1 to 50"),
        ("gaussian", {1: "2", "x": "3"}, "--op gaussian has no parameter '1'; its parameters are: sigma."),
        ("canny", {"low": "300", "high": "200"}, "--op canny: low 300 is above high 200; make low <= high."),
    ],
)
def test_bad_parameters_are_refused_with_the_value_and_the_fix(name: str, given: dict, message: str) -> None:
    with pytest.raises(InputError) as caught:
        ops.get(name).values(given)
    assert message in str(caught.value)


def test_an_unknown_operation_lists_the_known_ones() -> None:
    with pytest.raises(InputError, match="unknown operation --op 'sharpen'; choose one of: canny, gaussian, bilateral, denoise"):
        ops.get("sharpen")


def test_bilateral_strips_equal_the_whole_image_where_opencvs_ipp_variant_would_not() -> None:
    """The case `workarounds.opencv_without_ipp` documents: IPP's filter differs here."""
    op = ops.get("bilateral")
    values = op.values({"d": 12, "sigma_color": 68.014117307389, "sigma_space": 65.125})
    pixels = op.prepare(synthetic(18357560, 52, 54, 3))
    assert np.array_equal(distributed_in_process(op, pixels, 7, values), op.apply(pixels, values))
