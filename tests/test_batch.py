"""Batches: files, folders and globs in one command; a failing image does not stop the others."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import bilateral_filter, synthetic
from test_cli import run

from luminagrid import batch, jobs
from luminagrid.codec import Codec
from luminagrid.local import LocalCluster
from luminagrid.settings import Settings


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Three good photos, one corrupt file, and last run's output (which must not be read)."""
    src = tmp_path / "in"
    src.mkdir()
    for i, (h, w, c) in enumerate([(120, 90, 3), (67, 203, 1), (150, 151, 3)]):
        cv2.imwrite(str(src / f"img{i}.png"), synthetic(i, h, w, c))
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cv2.imwrite(str(src / "img0.edges.png"), np.zeros((4, 4), np.uint8))
    return src


def bilateral(path: Path) -> np.ndarray:
    return bilateral_filter(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), 5, 50, 50)


def test_a_folder_with_a_broken_file_writes_every_good_output_and_exits_1(
    cluster_env: dict[str, str], folder: Path, tmp_path: Path,
) -> None:
    out = tmp_path / "out" / "nested"  # created on demand
    proc = run(["submit", str(folder), "--op", "bilateral", "-p", "d=5", "-p", "sigma_color=50", "-p", "sigma_space=50",
                "--codec", "lossless", "--out-dir", str(out), "--jobs", "2"], cluster_env)
    assert proc.returncode == 1, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [f"img{i}.bilateral.png" for i in range(3)]  # no temp files
    for i in range(3):
        assert np.array_equal(cv2.imread(str(out / f"img{i}.bilateral.png"), cv2.IMREAD_UNCHANGED), bilateral(folder / f"img{i}.png"))
    assert f"error: {folder / 'broken.png'}: not a readable image" in proc.stderr
    assert "4 images: 3 ok, 1 failed" in proc.stdout
    assert proc.stdout.count("│ ok ") == 3 and proc.stdout.count("│ failed ") == 1  # the table's status cells
    assert "Traceback" not in proc.stderr


def test_files_and_globs_together_all_succeed_with_exit_0(cluster_env: dict[str, str], folder: Path, tmp_path: Path) -> None:
    (folder / "broken.png").unlink()
    proc = run(["submit", str(folder / "img0.png"), str(folder / "img[12].png"), "--codec", "lossless",
                "--out-dir", str(tmp_path / "out")], cluster_env)
    assert proc.returncode == 0, proc.stderr
    assert "3 images: 3 ok, 0 failed" in proc.stdout
    for i in range(3):
        gray = cv2.cvtColor(cv2.imread(str(folder / f"img{i}.png")), cv2.COLOR_BGR2GRAY)
        assert np.array_equal(cv2.imread(str(tmp_path / "out" / f"img{i}.edges.png"), cv2.IMREAD_UNCHANGED),
                              cv2.Canny(gray, 100, 200))


def test_a_pattern_that_matches_nothing_and_a_missing_file_fail_while_the_rest_is_done(
    cluster_env: dict[str, str], folder: Path,
) -> None:
    proc = run(["submit", str(folder / "img0.png"), str(folder / "*.tif"), str(folder / "gone.png")], cluster_env)
    assert proc.returncode == 1
    assert f"no file matches '{folder / '*.tif'}'; check the pattern." in proc.stderr
    assert f"{folder / 'gone.png'}: no such file" in proc.stderr
    assert (folder / "img0.edges.png").stat().st_size > 100  # replaced by the real output


def test_two_inputs_with_the_same_output_name_do_not_overwrite_each_other(
    cluster_env: dict[str, str], folder: Path, tmp_path: Path,
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(folder / "img1.png", other / "img0.png")
    out = tmp_path / "out"
    proc = run(["submit", str(folder / "img0.png"), str(other / "img0.png"), "--out-dir", str(out), "--codec", "lossless"],
               cluster_env)
    assert proc.returncode == 1
    assert f"its output {out / 'img0.edges.png'} is also {folder / 'img0.png'}'s" in proc.stderr
    gray = cv2.cvtColor(cv2.imread(str(folder / "img0.png")), cv2.COLOR_BGR2GRAY)
    assert np.array_equal(cv2.imread(str(out / "img0.edges.png"), cv2.IMREAD_UNCHANGED), cv2.Canny(gray, 100, 200))


def test_one_output_file_for_several_images_is_refused(cluster_env: dict[str, str], folder: Path) -> None:
    proc = run(["submit", str(folder), "-o", "x.png"], cluster_env)
    assert proc.returncode == 1
    assert "-o names one output file; with several images (or a folder or glob) use --out-dir DIR." in proc.stderr


def test_a_batch_keeps_at_most_the_requested_number_of_jobs_in_flight(cluster: LocalCluster, tmp_path: Path) -> None:
    for i in range(6):
        cv2.imwrite(str(tmp_path / f"p{i}.png"), synthetic(i, 64, 48, 3))
    items = batch.expand([str(tmp_path)], "gaussian", tmp_path / "out")
    (tmp_path / "out").mkdir()
    params = jobs.Params(op="gaussian", codec=Codec.lossless).validate()
    done, peak = batch.run(items, params, Settings.from_env(), max_in_flight=2, timeout_s=60)
    assert [i.state for i in done] == ["ok"] * 6
    assert peak == 2
    for i in range(6):
        img = cv2.imread(str(tmp_path / f"p{i}.png"))
        assert np.array_equal(cv2.imread(str(tmp_path / "out" / f"p{i}.gaussian.png")), cv2.GaussianBlur(img, (0, 0), 2.0))


def test_a_pattern_skips_luminagrids_own_outputs(cluster_env: dict[str, str], folder: Path) -> None:
    (folder / "broken.png").unlink()
    proc = run(["submit", str(folder / "img*.png"), "--op", "gaussian"], cluster_env)
    assert proc.returncode == 0, proc.stderr
    assert "3 images: 3 ok, 0 failed" in proc.stdout  # not img0.edges.png
    assert not list(folder.glob("*.edges.gaussian.png"))
