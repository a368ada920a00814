"""Streaming input: every format's strips, as read a band at a time, equal `cv2.imread`'s rows;
where streaming cannot be exact the image is decoded whole, and says why; a file truncated
mid-stream fails its job, publishes nothing more and leaves no output; memory follows the
strips, not the image."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import pyvips
from conftest import CLI, REPO, synthetic, wait_for

import luminagrid
from luminagrid import broker, images, jobs, ops, source, stages, strips
from luminagrid import codec as codec_module
from luminagrid.errors import InputError
from luminagrid.params import Params
from luminagrid.local import LocalCluster
from luminagrid.settings import CANCELLED_JOBS_KEY

READ = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR


def write_cv(name: str, image: np.ndarray, *flags: int):  # noqa: ANN201
    def make(folder: Path) -> Path:
        path = folder / name
        assert cv2.imwrite(str(path), image, list(flags))
        return path
    return make


def write_vips(name: str, image: np.ndarray, interpretation: str, **options: object):  # noqa: ANN201
    def make(folder: Path) -> Path:
        path = folder / name
        pyvips.Image.new_from_array(image).copy(interpretation=interpretation).write_to_file(str(path), **options)
        return path
    return make


GRAY, BGR, BGRA = synthetic(1, 301, 257), synthetic(2, 301, 257, channels=3), synthetic(3, 301, 257, channels=4)
GRAY16, BGR16 = synthetic(4, 301, 257, depth=np.uint16), synthetic(5, 301, 257, channels=3, depth=np.uint16)

FORMATS = {
    "png 8-bit gray": (write_cv("g8.png", GRAY), True),
    "png 8-bit BGR": (write_cv("c8.png", BGR), True),
    "png 8-bit BGRA": (write_cv("a8.png", BGRA), True),
    "png 16-bit gray": (write_cv("g16.png", GRAY16), True),
    "png 16-bit BGR": (write_cv("c16.png", BGR16), True),
    "png palette": (write_vips("pal.png", BGR[:, :, ::-1].copy(), "srgb", palette=True), True),
    "png gray + alpha": (write_vips("ga.png", np.dstack([GRAY, GRAY // 2]), "b-w"), True),
    "jpeg gray q90": (write_cv("g.jpg", GRAY, cv2.IMWRITE_JPEG_QUALITY, 90), True),
    "jpeg colour q95": (write_cv("c.jpg", BGR, cv2.IMWRITE_JPEG_QUALITY, 95), True),
    "jpeg colour q75": (write_cv("c75.jpg", BGR, cv2.IMWRITE_JPEG_QUALITY, 75), True),
    "tiff 8-bit BGR": (write_cv("c8.tif", BGR), True),
    "tiff 16-bit BGR": (write_cv("c16.tif", BGR16), True),
    "tiff 8-bit gray": (write_cv("g8.tif", GRAY), True),
    "webp": (write_cv("c.webp", BGR), False),
    "bmp colour": (write_cv("c.bmp", BGR), False),
    "bmp gray": (write_cv("g.bmp", GRAY), False),
    "png interlaced": (write_vips("inter.png", BGR[:, :, ::-1].copy(), "srgb", interlace=True), False),
    "jpeg EXIF orientation 6": (write_vips("rot.jpg", BGR[:, :, ::-1].copy(), "srgb"), False),
}


@pytest.mark.parametrize("name", FORMATS)
def test_streamed_strips_equal_what_opencv_decodes(name: str, tmp_path: Path) -> None:
    make, streamed = FORMATS[name]
    path = make(tmp_path)
    if name.startswith("jpeg EXIF"):  # a JPEG whose EXIF says "rotate 90": OpenCV applies it
        rotated = pyvips.Image.new_from_file(str(path)).copy()
        rotated.set_type(pyvips.GValue.gint_type, "orientation", 6)
        rotated.write_to_file(str(path))
    reference = cv2.imread(str(path), READ)
    src = source.open_source(path, 10**9)
    assert src.streamed is streamed, src.whole_because
    if not streamed:
        assert src.whole_because  # and `submit --verbose` says so
    assert (src.height, src.width) == reference.shape[:2]
    plan = strips.plan_strips(src.height, 7, 16)
    got = list(src.bands(plan))
    assert [s for s, _ in got] == plan
    for s, rows in got:
        assert rows.dtype == reference.dtype and np.array_equal(rows, reference[s.top:s.bottom]), (name, s)


@pytest.mark.parametrize("name", [name for name, (_, streamed) in FORMATS.items() if streamed])
def test_a_file_decoded_by_a_worker_equals_what_opencv_decodes(name: str, tmp_path: Path) -> None:
    # A small image travels as its file and a worker decodes it (`source.decode_file`): the
    # same pixels as the streamed strips, so the same output.
    path = FORMATS[name][0](tmp_path)
    reference = cv2.imread(str(path), READ)
    pixels = source.decode_file(path.read_bytes(), reference.shape[1], reference.shape[0])
    assert pixels.dtype == reference.dtype and np.array_equal(pixels, reference)


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: truncated_png(d, 300, 200), "the PNG is damaged or truncated"),
    (lambda d: truncated_file(d, "cut.jpg", 0.6), "the JPEG is damaged or truncated"),
    # OpenCV writes a TIFF's directory after its pixels: cut short, it has no header left
    (lambda d: truncated_file(d, "cut.tif", 0.6), "not a readable image"),
])
def test_a_damaged_file_fails_where_a_worker_decodes_it(make, message: str, tmp_path: Path) -> None:  # noqa: ANN001
    path = make(tmp_path)
    height, width = 300, 200
    with pytest.raises(InputError, match=message):
        source.decode_file(path.read_bytes(), width, height)


def test_a_worker_refuses_a_file_that_is_not_the_image_its_job_describes(tmp_path: Path) -> None:
    data = FORMATS["png 8-bit gray"][0](tmp_path).read_bytes()
    with pytest.raises(InputError, match="not a streamable 300x300"):
        source.decode_file(data, 300, 300)  # the file is 257x301
    with pytest.raises(InputError, match="interlaced PNG"):
        source.decode_file(FORMATS["png interlaced"][0](tmp_path).read_bytes(), 257, 301)
    with pytest.raises(InputError, match="not a readable image"):
        source.decode_file(b"\x89PNG not really", 257, 301)


def test_a_jpeg_with_bytes_before_a_marker_streams_as_opencv_reads_it(tmp_path: Path) -> None:
    """libjpeg only warns ("Corrupt JPEG data: 2 extraneous bytes before marker 0xda"), as many
    camera files make it do; OpenCV reads the file, and so must the stream, to the last strip."""
    ok, buf = cv2.imencode(".jpg", BGR, [cv2.IMWRITE_JPEG_QUALITY, 95])
    data = buf.tobytes()
    path = tmp_path / "extra.jpg"
    at = data.index(b"\xff\xda")  # the start-of-scan marker
    path.write_bytes(data[:at] + b"\x00\x00" + data[at:])
    reference = cv2.imread(str(path), READ)
    src = source.open_source(path, 10**9)
    assert src.streamed, src.whole_because
    plan = strips.plan_strips(src.height, 7, 16)
    for s, rows in src.bands(plan):
        assert np.array_equal(rows, reference[s.top:s.bottom]), s


def test_a_header_over_the_pixel_limit_is_refused_before_decoding(tmp_path: Path) -> None:
    path = write_cv("big.png", GRAY)(tmp_path)
    with pytest.raises(InputError, match="its header declares more pixels than the limit of 1000"):
        source.open_source(path, 1000)


def truncated_file(folder: Path, name: str, keep: float, height: int = 300, width: int = 200) -> Path:
    path = folder / name
    _, buf = cv2.imencode(Path(name).suffix, synthetic(10, height, width, channels=3))
    path.write_bytes(buf.tobytes()[: int(buf.size * keep)])
    return path


def truncated_png(folder: Path, height: int = 2400, width: int = 400, keep: float = 0.5) -> Path:
    path = folder / "cut.png"
    ok, buf = cv2.imencode(".png", synthetic(9, height, width))
    path.write_bytes(buf.tobytes()[: int(buf.size * keep)])
    return path


def test_a_file_truncated_mid_stream_fails_while_being_read(tmp_path: Path) -> None:
    path = truncated_png(tmp_path)
    src = source.open_source(path, 10**9)
    assert src.streamed
    plan = strips.plan_strips(src.height, 30, 8)
    seen = []
    with pytest.raises(InputError, match=r"the PNG is damaged or truncated: it could not be decoded past row \d+ of 2400"):
        for s, _ in src.bands(plan):
            seen.append(s.index)
    assert 0 < len(seen) < len(plan)  # it failed part-way, after strips that were fine


def test_submitting_a_file_truncated_mid_stream_cancels_what_went_out_and_leaves_no_output(tmp_path: Path) -> None:
    path = truncated_png(tmp_path)
    with LocalCluster(workers=1) as c:
        env = {**os.environ, "LUMINAGRID_BROKER_URL": c.url}
        proc = subprocess.run([*CLI, "submit", str(path), "--strips", "30"], env=env, capture_output=True,
                              text=True, timeout=120)
        r = broker.client(c.url)
        cancelled = [j.decode() for j in r.zrange(CANCELLED_JOBS_KEY, 0, -1)]
        records = {k.decode(): json.loads(r.get(k)) for k in r.keys("luminagrid:job:*")}
    assert proc.returncode == 1
    assert f"error: {path}: the PNG is damaged or truncated: it could not be decoded past row" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.png"]  # no output, no temp file
    # Strips had gone out before the damage was found: the job was cancelled, not left to run.
    assert [r["state"] for r in records.values()] == ["cancelled"] or cancelled, records


PEAK = """
import sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from luminagrid import source, strips
src = source.open_source(Path(sys.argv[2]), 10**10)
status = lambda: int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
before = status()
plan = strips.plan_strips(src.height, int(sys.argv[3]), 8)
for s, rows in src.bands(plan):
    pass
print(before, status(), src.streamed)
"""


def test_reading_holds_a_strip_at_a_time_not_the_image(tmp_path: Path) -> None:
    """Peak memory while streaming a gray PNG 8000 wide follows the strips (1 MB each), not the
    image: a 4x taller image costs no more."""
    grew = {}
    for rows in (3000, 12000):
        path = tmp_path / f"tall{rows}.png"
        cv2.imwrite(str(path), np.tile(synthetic(10, 500, 8000), (rows // 500, 1)))
        out = subprocess.run([sys.executable, "-c", PEAK, str(REPO), str(path), str(rows // 125)], capture_output=True,
                             text=True, timeout=120, check=True).stdout.split()
        assert out[2] == "True"
        grew[rows] = int(out[1]) - int(out[0])
    print(f"\nstreaming 8000x3000 and 8000x12000 gray PNGs (24 and 96 MB decoded) in 1 MB strips: peak memory "
          f"grew {grew[3000] >> 20} and {grew[12000] >> 20} MB")
    assert grew[12000] < 96_000_000 / 3 and grew[12000] - grew[3000] < 8 << 20


# --- small images travel as their files ----------------------------------------------------------


@pytest.mark.parametrize("codec", ["lossless", "jpeg"])
@pytest.mark.parametrize("name", ["png 8-bit BGR", "png 16-bit gray", "png gray + alpha", "jpeg colour q95",
                                  "tiff 8-bit gray"])
def test_a_small_image_goes_as_its_file_and_its_output_is_the_same(
    cluster: LocalCluster, name: str, codec: str, tmp_path: Path,
) -> None:
    # The worker decodes the file (the submitter reads only its header): exactly the output of the
    # same image cut into streamed strips, and of the operation on the whole image.
    path = FORMATS[name][0](tmp_path)
    job = luminagrid.submit(path, codec=codec, low=30, high=90)
    assert job.spec.file and job.strip_count == 1
    got = job.wait(60).image
    gray = images.to_gray8(cv2.imread(str(path), READ))
    if codec == "jpeg":
        gray = codec_module.jpeg_roundtrip(gray, 95)
    assert np.array_equal(got, ops.get("canny").apply(gray, {"low": 30, "high": 90}))
    streamed = luminagrid.submit(path, codec=codec, low=30, high=90, strips=3)
    assert not streamed.spec.file
    assert np.array_equal(streamed.wait(60).image, got)


def test_an_image_over_one_strip_is_streamed_in_strips(cluster: LocalCluster, tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    cv2.imwrite(str(path), synthetic(11, 600, 2000))  # 1.2 MP: over the Gaussian's 1 MP strips, under Canny's
    assert luminagrid.submit(path, codec="lossless").spec.file
    job = luminagrid.submit(path, op="gaussian", codec="lossless")
    assert not job.spec.file and job.strip_count > 1
    job.wait(120)


@pytest.mark.parametrize("make", [lambda d: truncated_file(d, "cut.png", 0.5),
                                  lambda d: truncated_file(d, "cut.jpg", 0.6)])
def test_a_damaged_small_file_fails_on_its_worker_with_the_submitters_message(
    cluster_env: dict[str, str], make, tmp_path: Path,  # noqa: ANN001
) -> None:
    path = make(tmp_path)
    proc = subprocess.run([*CLI, "submit", str(path), "--codec", "lossless"], env=cluster_env, capture_output=True,
                          text=True, timeout=120)
    kind = "PNG" if path.suffix == ".png" else "JPEG"
    assert proc.returncode == 1
    assert f"error: {path}: the {kind} is damaged or truncated" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no output, no temp file


def test_a_reader_started_early_is_the_one_the_job_is_sent_from(cluster: LocalCluster, tmp_path: Path) -> None:
    # The command line starts decoding before it imports Celery; sending then takes those strips.
    path = tmp_path / "tall.png"
    gray = synthetic(12, 2400, 2000)  # 4.8 MP: over one Canny strip, so it is streamed, not sent whole
    cv2.imwrite(str(path), gray)
    src = source.open_source(path, 10**9)
    params = Params(codec=codec_module.Codec.lossless).validate()
    file, plan = source.plan_for(src, params)
    assert not file and len(plan) >= 2
    timing = stages.Stages()
    reader = src.read_ahead(plan, timing)
    wait_for(lambda: reader.handoff.qsize() >= min(len(plan), reader.ahead), 30, "strips decoded ahead")
    job = jobs.submit_source(src, params, stages=timing)
    assert src.reader is reader
    assert np.array_equal(job.wait(60).image, ops.get("canny").apply(gray, {"low": 100.0, "high": 200.0}))
