"""Operations from an installed package (`examples/plugin`): exact across real workers, checked by
`check-op`, and refused with a clear message by a worker that lacks the package or has another
version of it.

The package is installed with pip into a folder of its own (`pip install --target`, built from
its `pyproject.toml`), and variants of that install (another version; a halo one row short) into
others; each folder goes on the `PYTHONPATH` of exactly the processes that should have it: the
workers of a cluster and the `cli.py` subprocesses that submit. The session's shared cluster
never has it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import PLUGIN_PACKAGE as PACKAGE
from conftest import synthetic
from test_cli import run

from luminagrid import exactness, ops, strips
from luminagrid import record as records
from luminagrid.errors import OperationUnavailable
from luminagrid.record import Record
from luminagrid.local import LocalCluster

JPEG_444 = [cv2.IMWRITE_JPEG_QUALITY, 95, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]


def variant(site: Path, tmp: Path, name: str, version: str, edit: tuple[str, str, str] | None = None) -> Path:
    """A copy of an installed site with the package's version changed (what pip would have made
    of the same source at `version`; one pip build is enough), one file's text replaced (path,
    old, new)."""
    copy = tmp / name
    shutil.copytree(site, copy)
    (info,) = copy.glob("luminagrid_example_ops-*.dist-info")
    metadata = (info / "METADATA").read_text()
    assert "\nVersion: 0.1.0\n" in metadata
    (info / "METADATA").write_text(metadata.replace("\nVersion: 0.1.0\n", f"\nVersion: {version}\n"))
    info.rename(copy / f"luminagrid_example_ops-{version}.dist-info")
    if edit:
        path, old, new = edit
        text = (copy / path).read_text()
        assert old in text
        (copy / path).write_text(text.replace(old, new))
    return copy


@pytest.fixture(scope="module")
def sites(plugin_site: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders with the plugin installed: "v1" as shipped (0.1.0, installed by pip: `plugin_site`),
    "v2" the same code as 0.2.0, "short" a 0.1.1 whose median declares a halo one row short."""
    tmp = tmp_path_factory.mktemp("plugins")
    v1 = plugin_site
    return {
        "v1": v1,
        "v2": variant(v1, tmp, "site-v2", "0.2.0"),
        "short": variant(v1, tmp, "site-short", "0.1.1", (
            "luminagrid_example_ops/median.py", 'return int(values["ksize"]) // 2', 'return int(values["ksize"]) // 2 - 1',
        )),
    }


def env_with(site: Path | None, broker_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LUMINAGRID_RESULT_BACKEND")}
    if site is not None:
        env["PYTHONPATH"] = str(site)
    if broker_url is not None:
        env["LUMINAGRID_BROKER_URL"] = broker_url
    return env


@pytest.fixture(scope="module")
def plugin_cluster(sites: dict[str, Path]) -> Iterator[LocalCluster]:
    """Redis and two workers (one pool process each) that have the plugin at 0.1.0."""
    with LocalCluster(workers=2, concurrency=1, worker_env={"PYTHONPATH": str(sites["v1"])}) as c:
        yield c


def submit(image: np.ndarray, tmp_path: Path, env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    path = tmp_path / "in.png"
    cv2.imwrite(str(path), image)
    out = tmp_path / "out.png"
    return run(["submit", str(path), "-o", str(out), "--json", *args], env), out


def test_ops_lists_the_plugins_operations_with_package_and_version(sites: dict[str, Path]) -> None:
    proc = run(["ops", "--json"], env_with(sites["v1"]))
    assert proc.returncode == 0, proc.stderr
    listed = {o["op"]: o for o in map(json.loads, proc.stdout.splitlines())}
    assert set(listed) == {*ops.REGISTRY, "median", "morph"}
    assert (listed["median"]["package"], listed["median"]["version"]) == (PACKAGE, "0.1.0")
    assert listed["morph"]["entry_point"] == "morph = luminagrid_example_ops.morph:OP"
    assert [p["choices"] for p in listed["morph"]["params"]] == [["open", "close", "gradient"], None]
    assert (listed["canny"]["package"], listed["canny"]["version"]) == ("luminagrid", ops.origin("canny").version)
    human = run(["ops"], {**env_with(sites["v1"]), "COLUMNS": "200"})
    assert "median" in human.stdout and f"from {PACKAGE} 0.1.0" in human.stdout and "open|close|gradient" in human.stdout


@pytest.mark.parametrize(
    ("op", "params", "channels", "codec", "expected"),
    [
        ("median", {"ksize": 15}, 3, "lossless", lambda a: cv2.medianBlur(a, 15)),
        ("median", {"ksize": 3}, 1, "jpeg", lambda a: cv2.medianBlur(a, 3)),
        ("morph", {"mode": "open", "ksize": 31}, 1, "lossless",
         lambda a: cv2.morphologyEx(a, cv2.MORPH_OPEN, np.ones((31, 31), np.uint8))),
        ("morph", {"mode": "close", "ksize": 9}, 3, "jpeg",
         lambda a: cv2.morphologyEx(a, cv2.MORPH_CLOSE, np.ones((9, 9), np.uint8))),
        ("morph", {"mode": "gradient", "ksize": 5}, 3, "lossless",
         lambda a: cv2.morphologyEx(a, cv2.MORPH_GRADIENT, np.ones((5, 5), np.uint8))),
    ],
)
def test_plugin_operations_run_exactly_across_both_workers(
    plugin_cluster: LocalCluster, sites: dict[str, Path], tmp_path: Path, op: str, params: dict, channels: int, codec: str, expected,  # noqa: ANN001
) -> None:
    image = synthetic(7, 517, 301, channels)
    flags = [f for k, v in params.items() for f in ("-p", f"{k}={v}")]
    proc, out = submit(image, tmp_path, env_with(sites["v1"], plugin_cluster.url),
                       "--op", op, *flags, "--strips", "9", "--codec", codec)
    assert proc.returncode == 0, proc.stderr
    done = json.loads(proc.stdout.splitlines()[-1])
    assert done["status"] == "done" and done["strips"] == 9
    assert len({w.split("[")[0] for w in done["workers"]}) == 2, done["workers"]
    source = image if codec == "lossless" else cv2.imdecode(
        cv2.imencode(".jpg", image, JPEG_444 if channels == 3 else JPEG_444[:2])[1], cv2.IMREAD_UNCHANGED)
    assert np.array_equal(cv2.imread(str(out), cv2.IMREAD_UNCHANGED), expected(source))


@pytest.mark.parametrize("op", ["median", "morph"])
def test_check_op_passes_the_example_plugin(sites: dict[str, Path], op: str) -> None:
    proc = run(["check-op", op], env_with(sites["v1"]))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"check-op {op} ({PACKAGE} 0.1.0)" in proc.stdout and f"ok: {op} on strips is identical" in proc.stdout
    assert "FAIL" not in proc.stdout


def test_check_op_catches_a_halo_one_row_short_that_the_8_row_grid_hides(sites: dict[str, Path]) -> None:
    proc = run(["check-op", "median", "--json"], env_with(sites["short"]))
    assert proc.returncode == 1
    assert ("error: operation median (luminagrid-example-ops 0.1.1) is not exact across strips at 3 of 3 parameter "
            "sets; at ksize=5 it declares a halo of 1 row and the smallest halo that made every case identical is 2 "
            "rows; fix its halo_rows().") in proc.stderr
    verdicts = {v["params"]["ksize"]: v for v in map(json.loads, proc.stdout.splitlines())}
    assert {k: (v["ok"], v["declared_halo_rows"], v["smallest_halo_rows"]) for k, v in verdicts.items()} == {
        3: (False, 0, 1), 5: (False, 1, 2), 15: (False, 6, 7)}
    # Why it needs this check: on the cluster's 8-row grid, the short halo rounds up to 8 and hides.
    sys.path.insert(0, str(sites["short"]))
    try:
        from luminagrid_example_ops import median  # noqa: PLC0415
    finally:
        sys.path.remove(str(sites["short"]))
    pixels = exactness.picture("noise", 203, 47, 1, 5)
    values = median.OP.values({"ksize": 15})
    rounded = strips.halo_for(median.OP.halo_rows(values))
    assert rounded == 8 and np.array_equal(
        exactness.distributed(median.OP, pixels, 7, rounded, values, align_rows=8), median.OP.apply(pixels, values))


def test_a_worker_without_the_plugin_fails_the_job_naming_the_operation_and_package(
    cluster_env: dict[str, str], sites: dict[str, Path], tmp_path: Path,
) -> None:
    """The session's shared cluster has no plugin; the submitter has it."""
    proc, out = submit(synthetic(3, 120, 90), tmp_path, {**cluster_env, "PYTHONPATH": str(sites["v1"])},
                       "--op", "median", "--strips", "2")
    assert proc.returncode == 1
    assert "has no operation 'median': the job was submitted with it from package luminagrid-example-ops 0.1.0; " \
           "install that package on every worker (pip install 'luminagrid-example-ops==0.1.0')" in proc.stderr
    assert "worker " in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["status"] == "failed"
    assert not out.exists()


def test_a_worker_with_another_version_refuses_the_strips_naming_both(sites: dict[str, Path], tmp_path: Path) -> None:
    """Workers with 0.2.0 of the package, a submitter with 0.1.0 (same code, other version)."""
    with LocalCluster(workers=1, concurrency=1, worker_env={"PYTHONPATH": str(sites["v2"])}) as other:
        proc, out = submit(synthetic(4, 120, 90), tmp_path, env_with(sites["v1"], other.url),
                           "--op", "median", "--strips", "2")
    assert proc.returncode == 1
    assert ("has operation 'median' from luminagrid-example-ops 0.2.0, but the job was submitted with "
            "luminagrid-example-ops 0.1.0; every node must run the same version") in proc.stderr
    assert "worker local1@" in proc.stderr and "Traceback" not in proc.stderr and not out.exists()


def test_an_operation_the_submitter_lacks_is_an_input_error_listing_the_known_ones(cluster_env: dict[str, str],
                                                                                  tmp_path: Path) -> None:
    proc, out = submit(synthetic(3, 40, 30), tmp_path, cluster_env, "--op", "median")
    assert proc.returncode == 1
    assert "error: unknown operation --op 'median'; choose one of: canny, gaussian, bilateral, denoise" in proc.stderr
    assert not out.exists()


def test_a_plugin_that_fails_to_load_is_reported_not_fatal(tmp_path: Path) -> None:
    """An installed package whose entry point cannot be imported (or is not an Operation):
    `ops` warns, the built-ins still work, and asking for it repeats why."""
    site = tmp_path / "site"
    for dist, entry, module, body in (
        ("broken_ops-1.0", "sharpen = broken_ops_mod:OP", "broken_ops_mod", "raise ImportError('no module named cv3')\n"),
        ("odd_ops-2.0", "odd = odd_ops_mod:OP", "odd_ops_mod", "OP = 42\n"),
    ):
        info = site / f"{dist}.dist-info"
        info.mkdir(parents=True)
        name, version = dist.split("-")
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[luminagrid.ops]\n{entry}\n")
        (site / f"{module}.py").write_text(body)
    env = env_with(site)
    listed = run(["ops"], env)
    assert listed.returncode == 0 and "canny" in listed.stdout
    assert ("warning: operation sharpen is not available: broken_ops 1.0: loading broken_ops_mod:OP raised "
            "ImportError: no module named cv3") in listed.stderr
    assert "warning: operation odd is not available: odd_ops 2.0: odd_ops_mod:OP is not a usable operation: it is a " \
           "int, not an instance of luminagrid.ops.Operation" in listed.stderr
    asked = run(["check-op", "sharpen"], env)
    assert asked.returncode == 1
    assert "error: operation 'sharpen' is installed but unusable: broken_ops 1.0: loading" in asked.stderr


def test_a_node_without_the_plugin_still_reads_its_jobs_records_to_supervise_them() -> None:
    """The supervisor of a node that lacks an operation plans, recovers and cleans up its jobs from
    what the record carries (halo, fields), and only the tasks insist on the operation itself.
    This test process has no plugin."""
    raw = json.dumps({"id": "j1", "op": "median", "params": {"ksize": 15}, "width": 90, "height": 120, "channels": 3,
                      "strips": 3, "codec": "jpeg", "quality": 95, "file": False, "package": PACKAGE, "version": "0.1.0",
                      "halo_rows": 8, "fields": ["pixels"], "output": "/tmp/x.png", "submitted_at": 1.0, "state": "running"})
    rec = Record.from_json(raw, 10**6)
    assert [(s.top, s.row0, s.row1, s.bottom) for s in rec.plan()] == [(0, 0, 40, 48), (32, 40, 80, 88), (72, 80, 120, 120)]
    assert "luminagrid:out:j1:2:pixels" in [k if isinstance(k, str) else k.decode() for k in records.data_keys(rec)]
    with pytest.raises(OperationUnavailable, match="this node has no operation 'median': the job was submitted with it "
                                                   f"from package {PACKAGE} 0.1.0"):
        rec.spec.operation  # noqa: B018 - what collecting the output (or a task) needs
