"""Real jobs through real Redis and real worker processes, compared pixel for pixel."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import cv2
import msgpack
import numpy as np
import pytest
from conftest import synthetic
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import luminagrid
from luminagrid import codec
from luminagrid.app import app
from luminagrid.images import to_gray8
from luminagrid.local import LocalCluster

TIMEOUT_S = 60


def reference(image: np.ndarray, low: float, high: float, kind: str, quality: int) -> np.ndarray:
    """Single-machine answer: Canny of the gray image (of its JPEG round trip in jpeg mode).

    Thresholds are whole numbers as luminagrid documents (`canny.whole_thresholds`).
    """
    gray = to_gray8(image)
    if kind == "jpeg":
        ok, buf = cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, quality])
        gray = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    return cv2.Canny(gray, math.floor(low), math.floor(high))


images = st.builds(
    synthetic,
    seed=st.integers(0, 2**32 - 1),
    height=st.integers(1, 260),
    width=st.integers(1, 260),
    channels=st.sampled_from([1, 3, 4]),
    depth=st.sampled_from([np.uint8, np.uint16]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    image=images,
    strips=st.one_of(st.none(), st.integers(1, 40)),
    low=st.floats(0, 250),
    span=st.floats(0, 250),
    kind=st.sampled_from(["lossless", "jpeg"]),
    quality=st.integers(1, 100),
)
def test_distributed_output_equals_single_machine_canny(
    cluster: LocalCluster, image: np.ndarray, strips: int | None, low: float, span: float, kind: str, quality: int,
) -> None:
    job = luminagrid.submit(image, low=low, high=low + span, strips=strips, codec=kind, quality=quality)
    result = job.wait(TIMEOUT_S)
    assert np.array_equal(result.edges, reference(image, low, low + span, kind, quality))


def test_a_threshold_just_below_a_whole_number_acts_as_its_floor_on_every_thread_count(cluster: LocalCluster) -> None:
    # OpenCV's single-threaded Canny (the workers') rounds 9.999999999999972 to float32 (10.0).
    image = synthetic(0, 16, 247)
    result = luminagrid.submit(image, low=9.999999999999972, high=9.999999999999972, codec="lossless").wait(TIMEOUT_S)
    assert np.array_equal(result.edges, cv2.Canny(image, 9, 9))
    assert not np.array_equal(result.edges, cv2.Canny(image, 10, 10))


@pytest.mark.parametrize("kind", ["lossless", "jpeg"])
@pytest.mark.parametrize("strips", [2, 7, 33])
def test_a_1080p_photo_like_image_is_exact_and_spread_over_both_workers(
    cluster: LocalCluster, kind: str, strips: int,
) -> None:
    image = synthetic(42, 1080, 1920, channels=3)
    result = luminagrid.submit(image, low=40, high=120, strips=strips, codec=kind).wait(TIMEOUT_S)
    assert np.array_equal(result.edges, reference(image, 40, 120, kind, 95))
    assert sum(result.workers.values()) == strips
    if strips >= 7:
        assert len({name.split("[")[0] for name in result.workers}) == 2, result.workers


@pytest.mark.parametrize(
    ("name", "image"),
    [
        ("gray.png", synthetic(1, 131, 97)),
        ("bgr.png", synthetic(2, 77, 203, channels=3)),
        ("bgra.png", synthetic(3, 64, 65, channels=4)),
        ("gray16.png", synthetic(4, 90, 45, depth=np.uint16)),
        ("bgr16.tiff", synthetic(5, 41, 70, channels=3, depth=np.uint16)),
        ("one-row.png", synthetic(6, 1, 300)),
        ("one-pixel.bmp", synthetic(7, 1, 1)),
        ("photo.jpg", synthetic(8, 120, 160, channels=3)),
        ("photo.webp", synthetic(9, 50, 61, channels=3)),
    ],
)
def test_files_of_every_supported_kind_are_exact(cluster: LocalCluster, tmp_path: Path, name: str, image: np.ndarray) -> None:
    path = tmp_path / name
    assert cv2.imwrite(str(path), image)
    decoded = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # what the file holds (JPEG/WebP are lossy)
    for kind in ("lossless", "jpeg"):
        result = luminagrid.submit(path, codec=kind, strips=5, low=30, high=90).wait(TIMEOUT_S)
        assert np.array_equal(result.edges, reference(decoded, 30, 90, kind, 95)), kind


def test_more_strips_than_rows_runs_as_few_strips_as_the_height_allows(cluster: LocalCluster) -> None:
    image = synthetic(10, 3, 50)
    job = luminagrid.submit(image, strips=200, codec="lossless", low=5, high=10)
    assert job.strip_count == 1
    assert np.array_equal(job.wait(TIMEOUT_S).edges, reference(image, 5, 10, "lossless", 95))


@pytest.mark.parametrize(
    ("op", "size"),
    [("canny", 64), ("canny", 1200), ("bilateral", 700)],  # larger ones travel as claim checks
)
def test_a_finished_job_leaves_no_results_in_redis(cluster: LocalCluster, op: str, size: int) -> None:
    """Every payload waits in Redis (the supervisor republishes from there); large ones travel
    only as claims, small ones inside their messages too. A collected job leaves nothing behind."""
    from luminagrid import broker
    from luminagrid.settings import QUEUE

    with broker.client(cluster.url) as r:
        # Keep the strips queued a moment, to look at their messages.
        app.control.cancel_consumer(QUEUE, reply=True)
        try:
            job = luminagrid.submit(synthetic(11, size, size, 3), op=op, strips=4, codec="lossless")
            assert len(r.keys(f"luminagrid:in:{job.id}:*:payload")) == 4
            payloads = [msgpack.unpackb(base64.b64decode(json.loads(m)["body"]))[0][2] for m in r.lrange(QUEUE, 0, -1)]
            as_claims = sum(isinstance(p, dict) and "claim" in p for p in payloads)
            assert len(payloads) == 4
        finally:
            app.control.add_consumer(QUEUE, reply=True)
        assert (as_claims == 4) if size > 300 else (as_claims == 0)
        job.wait(TIMEOUT_S)
        assert not r.keys(f"*{job.id}*")


def test_edge_maps_are_packed_compactly() -> None:
    edges = cv2.Canny(synthetic(12, 1000, 1000), 100, 200) > 0
    assert len(codec.pack_bits(edges)) < 1000 * 1000 / 8  # below one bit per pixel
