"""Every operation through real Redis and real workers, compared with the whole-image OpenCV call."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import bilateral_filter, synthetic
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import run
from test_ops import PARAMS

import luminagrid
from luminagrid import ops
from luminagrid.local import LocalCluster

TIMEOUT_S = 60
JPEG_444 = [cv2.IMWRITE_JPEG_QUALITY, 95, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]

#: The OpenCV call each operation stands for, written out here independently of luminagrid.
OPENCV = {
    "canny": lambda a, v: cv2.Canny(a, int(v["low"]), int(v["high"])),
    "gaussian": lambda a, v: cv2.GaussianBlur(a, (0, 0), v["sigma"]),
    "bilateral": lambda a, v: bilateral_filter(a, v["d"], v["sigma_color"], v["sigma_space"]),
    "denoise": lambda a, v: (
        cv2.fastNlMeansDenoising(a, None, v["h"], v["template_window"], v["search_window"]) if a.ndim == 2
        else cv2.fastNlMeansDenoisingColored(a, None, v["h"], v["h_color"], v["template_window"], v["search_window"])
    ),
}


def as_computed(image: np.ndarray, name: str) -> np.ndarray:
    """The 8-bit image an operation computes on, written out: gray for Canny, else gray or BGR."""
    image = (image >> 8).astype(np.uint8) if image.dtype == np.uint16 else image
    if image.ndim == 3 and (name == "canny" or image.shape[2] == 4):
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY if name == "canny" and image.shape[2] == 4
                             else cv2.COLOR_BGR2GRAY if name == "canny" else cv2.COLOR_BGRA2BGR)
    return image


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.data(),
    name=st.sampled_from(list(ops.REGISTRY)),
    height=st.integers(1, 200),
    width=st.integers(1, 160),
    channels=st.sampled_from([1, 3, 4]),
    strips=st.one_of(st.none(), st.integers(1, 24)),
)
def test_every_operation_distributed_equals_the_whole_image_opencv_call(
    cluster: LocalCluster, data: st.DataObject, name: str, height: int, width: int, channels: int, strips: int | None,
) -> None:
    params = data.draw(PARAMS[name])
    image = synthetic(data.draw(st.integers(0, 2**31)), height, width, channels)
    result = luminagrid.submit(image, op=name, params=params, strips=strips, codec="lossless").wait(TIMEOUT_S)
    values = ops.get(name).values(params)
    assert np.array_equal(result.image, OPENCV[name](as_computed(image, name), values))


@pytest.mark.parametrize("name", ["gaussian", "bilateral", "denoise"])
@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_mode_equals_the_operation_on_the_decoded_whole_image_jpeg(
    cluster: LocalCluster, name: str, channels: int,
) -> None:
    image = synthetic(31, 203, 157, channels)
    result = luminagrid.submit(image, op=name, strips=7, codec="jpeg", quality=95).wait(TIMEOUT_S)
    decoded = cv2.imdecode(cv2.imencode(".jpg", image, JPEG_444 if channels == 3 else JPEG_444[:2])[1], cv2.IMREAD_UNCHANGED)
    assert np.array_equal(result.image, OPENCV[name](decoded, ops.get(name).values({})))


@pytest.mark.parametrize("strips", [None, 7])
def test_a_1080p_colour_photo_is_denoised_exactly_across_both_workers(cluster: LocalCluster, strips: int | None) -> None:
    image = synthetic(42, 1080, 1920, channels=3)
    values = {"h": 7.0, "h_color": 7.0, "template_window": 5, "search_window": 11}  # lighter than defaults: test time
    result = luminagrid.submit(image, op="denoise", params=values, strips=strips, codec="lossless").wait(TIMEOUT_S * 2)
    assert np.array_equal(result.image, OPENCV["denoise"](image, values))
    assert len({name.split("[")[0] for name in result.workers}) == 2, result.workers


def test_cli_bilateral_with_parameters_writes_the_exact_colour_output(cluster_env: dict[str, str], tmp_path: Path) -> None:
    photo = tmp_path / "photo.png"
    cv2.imwrite(str(photo), synthetic(21, 301, 257, channels=3))
    proc = run(["submit", str(photo), "--op", "bilateral", "-p", "d=9", "-p", "sigma_color=75", "--codec", "lossless"],
               cluster_env)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "photo.bilateral.png"
    assert f"bilateral -> {out}" in proc.stdout
    assert np.array_equal(cv2.imread(str(out), cv2.IMREAD_UNCHANGED), bilateral_filter(cv2.imread(str(photo)), 9, 75, 75))


def test_ops_command_lists_every_operation_and_parameter(cluster_env: dict[str, str]) -> None:
    proc = run(["ops"], cluster_env)
    assert proc.returncode == 0
    for op in ops.REGISTRY.values():
        assert op.name in proc.stdout
        for p in op.params:
            assert p.name in proc.stdout


def test_jpeg_at_quality_100_of_noise_is_larger_than_raw_and_still_accepted(cluster: LocalCluster) -> None:
    noise = np.random.default_rng(3).integers(0, 256, (256, 512, 3), dtype=np.uint8)
    assert len(cv2.imencode(".jpg", noise, [cv2.IMWRITE_JPEG_QUALITY, 100, *JPEG_444[2:]])[1]) > noise.size
    result = luminagrid.submit(noise, op="gaussian", strips=2, codec="jpeg", quality=100).wait(TIMEOUT_S)
    decoded = cv2.imdecode(cv2.imencode(".jpg", noise, [cv2.IMWRITE_JPEG_QUALITY, 100, *JPEG_444[2:]])[1], cv2.IMREAD_UNCHANGED)
    assert np.array_equal(result.image, cv2.GaussianBlur(decoded, (0, 0), 2.0))


def test_canny_with_a_whole_strip_of_pending_pixels_is_exact(cluster: LocalCluster) -> None:
    """Pending pixels take 8 bytes each: a strip full of them is larger than its raw pixels."""
    image = np.zeros((1016, 1024), np.uint8)
    image[:, ::4] = 255  # vertical lines cross the seam; high=2040 leaves no strong pixel to resolve them
    result = luminagrid.submit(image, low=10, high=2040, strips=2, codec="lossless").wait(TIMEOUT_S)
    assert np.array_equal(result.image, cv2.Canny(image, 10, 2040))
