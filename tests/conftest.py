"""Shared fixtures: a real Redis and real `celery worker` processes, started and stopped here."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import signal
import subprocess
import sys
import uuid
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np
import pytest

from luminagrid import ops
from luminagrid.app import use_broker
from luminagrid.local import LocalCluster
from luminagrid.workarounds import opencv_without_ipp

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, str(REPO / "cli.py")]
#: The example plugin's source (operations median and morph) and its distribution's name.
PLUGIN = REPO / "examples" / "plugin"
PLUGIN_PACKAGE = "luminagrid-example-ops"


def bilateral_filter(image: np.ndarray, d: int, sigma_color: float, sigma_space: float) -> np.ndarray:
    """`cv2.bilateralFilter` as luminagrid defines it: OpenCV's own code, not IPP's non-local variant."""
    with opencv_without_ipp():
        return cv2.bilateralFilter(image, d, sigma_color, sigma_space)


def synthetic(seed: int, height: int, width: int, channels: int = 1, depth: type = np.uint8) -> np.ndarray:
    """A photo-like test image: multi-scale blurred noise, a gradient, lines and circles.

    Long thin structures cross strip seams, which is where strip-parallel Canny can go wrong.
    """
    rng = np.random.default_rng(seed)
    img = np.zeros((height, width), np.float32)
    for sigma in (0.7, 2.5, 8.0):
        noise = rng.normal(0, 1, (height, width)).astype(np.float32)
        img += cv2.GaussianBlur(noise, (0, 0), sigma) * sigma * 20
    img += np.linspace(0, 60, width, dtype=np.float32)[None, :]
    canvas = np.zeros((height, width), np.uint8)
    for _ in range(max(1, (height + width) // 40)):
        p1 = tuple(int(v) for v in rng.integers(0, [width, height]))
        p2 = tuple(int(v) for v in rng.integers(0, [width, height]))
        cv2.line(canvas, p1, p2, int(rng.integers(20, 120)), int(rng.integers(1, 3)))
        cv2.circle(canvas, p1, int(rng.integers(2, 40)), int(rng.integers(20, 120)), 1)
    img += cv2.GaussianBlur(canvas.astype(np.float32), (0, 0), 0.8)
    img = np.clip(img + 110, 0, 255)
    if channels > 1:
        planes = [np.clip(img + rng.normal(0, 8), 0, 255) for _ in range(channels)]
        img = np.dstack(planes)
    if depth == np.uint16:
        return (img * 257).astype(np.uint16)
    return img.astype(np.uint8)


def forged_jpeg(height: int, width: int, pad_bytes: int = 0) -> bytes:
    """A real 16x16 gray JPEG whose frame header (SOF0) says `height` x `width`, padded with a
    comment segment to the size of a plausible strip."""
    data = cv2.imencode(".jpg", np.full((16, 16), 128, np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    at = data.index(b"\xff\xc0")
    data = data[: at + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[at + 9 :]
    comment = b"\xff\xfe" + (pad_bytes + 2).to_bytes(2, "big") + bytes(pad_bytes)
    return data[:2] + comment + data[2:]


@pytest.fixture(scope="session")
def _session_cluster() -> Iterator[LocalCluster]:
    with LocalCluster(workers=2, concurrency=1) as c:
        yield c


@pytest.fixture
def cluster(_session_cluster: LocalCluster) -> LocalCluster:
    """A private Redis and two worker nodes (one pool process each), shared by the session.

    Other modules start clusters of their own; this points the client at the shared one again.
    """
    use_broker(_session_cluster.url)
    return _session_cluster


def processes_with(marker: str) -> list[int]:
    """PIDs of live processes whose environment holds `marker` (children inherit it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def wait_for(condition: Callable[[], T], timeout_s: float, what: str, poll_s: float = 0.01) -> T:
    """Poll `condition` until it returns something truthy; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(poll_s)


@pytest.fixture
def cluster_env(cluster: LocalCluster) -> dict[str, str]:
    """Environment for a `cli.py` subprocess that talks to the session cluster."""
    env = dict(os.environ)
    env["LUMINAGRID_BROKER_URL"] = cluster.url
    env.pop("LUMINAGRID_RESULT_BACKEND", None)
    return env


@dataclass
class ClusterRun:
    """A `cli.py cluster` subprocess: its banner (the lines before "Ctrl-C stops everything.")."""

    proc: subprocess.Popen[str]
    marker: str  # in the environment of everything it starts (see `processes_with`)
    flower_port: int
    banner: list[str] = field(default_factory=list)
    out: str = ""
    err: str = ""

    @property
    def url(self) -> str:
        line = next(line for line in self.banner if "export LUMINAGRID_BROKER_URL=" in line)
        return line.split("export LUMINAGRID_BROKER_URL=", 1)[1].strip()

    def stop(self, sig: signal.Signals = signal.SIGINT, timeout_s: float = 60) -> None:
        """Stop it as a user would, and keep what it printed."""
        self.proc.send_signal(sig)
        self.out, self.err = self.proc.communicate(timeout=timeout_s)


@contextlib.contextmanager
def cli_cluster(workers: int, flower_port: int) -> Iterator[ClusterRun]:
    """Run `cli.py cluster` without any LUMINAGRID_/FLOWER_ settings of the caller; on the way out,
    stop whatever of it still runs (a failed assertion): itself, then what it started, by PID."""
    marker = f"marker-{uuid.uuid4()}"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("LUMINAGRID_", "FLOWER_"))},
           "LUMINAGRID_TEST_MARKER": marker}
    proc = subprocess.Popen([*CLI, "cluster", "--workers", str(workers), "--flower-port", str(flower_port)],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = ClusterRun(proc, marker, flower_port)
    try:
        assert proc.stdout is not None
        while not run.banner or not run.banner[-1].startswith("Ctrl-C") and run.banner[-1]:
            run.banner.append(proc.stdout.readline())
        yield run
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate(timeout=30)
        for pid in processes_with(marker):  # Redis, workers, Flower it started, if it could not stop them
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# --- the example plugin, installed as a user installs it ----------------------------------------

def pip_install(source: Path, target: Path) -> Path:
    """Install the package in `source` into the folder `target` (as a user installs it, built by pip)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                           str(source)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return target


def copy_of(target: Path) -> Path:
    """The example plugin's source, copied: pip leaves `build/` and `*.egg-info` where it builds."""
    shutil.copytree(PLUGIN, target, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    return target


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the example plugin (0.1.0) installed by pip, built once per session: put it on
    the PYTHONPATH of the processes that should have the plugin."""
    tmp = tmp_path_factory.mktemp("plugin")
    return pip_install(copy_of(tmp / "src"), tmp / "site")  # (a copy: pip builds in the source folder)


@contextlib.contextmanager
def plugin_in_this_process(site: Path) -> Iterator[list[str]]:
    """Register the operations of the plugin installed in `site` in this (the test) process, so
    `luminagrid.submit` can submit them, as a submitter with the package installed does; on the
    way out, forget them again (other tests expect the built-ins only). Yields their names."""
    sys.path.insert(0, str(site))
    added: list[str] = []
    try:
        for entry in importlib.metadata.entry_points(group=ops.GROUP):
            if entry.dist is not None and Path(str(entry.dist.locate_file(""))).resolve() == site.resolve() \
                    and entry.name not in ops.REGISTRY:
                ops._register(entry)  # noqa: SLF001 - what `luminagrid.ops` does for each entry point at import
                if entry.name in ops.REGISTRY:
                    added.append(entry.name)
        yield added
    finally:
        for name in added:
            ops.REGISTRY.pop(name, None)
            ops._ORIGINS.pop(name, None)  # noqa: SLF001
        sys.path.remove(str(site))
        for module in [m for m in sys.modules if m.split(".")[0] == "luminagrid_example_ops"]:
            del sys.modules[module]
