"""Liveness under CPU starvation: both cores saturated by unrelated busy processes for 60 s while a
2-worker cluster runs jobs of every operation back to back. No live worker may be declared lost
(a false loss runs its strips twice and counts toward the job's recovery limit), no strip may run
twice, and every output stays exact: the test doubles as "every operation is exact on a starved
cluster".

It also measures how late beats get: the lowest remaining lifetime (PTTL) of each worker's
liveness record, sampled all along; it would reach 0 the moment a worker is taken for lost.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import cv2
import faults
import numpy as np
import pytest
from conftest import REPO, bilateral_filter, plugin_in_this_process, synthetic

import luminagrid
from luminagrid import broker
from luminagrid.app import use_broker
from luminagrid.local import LocalCluster
from luminagrid.settings import ALIVE_KEY, EVENTS_KEY, NODES_KEY, Settings

DEFAULTS = Settings()
STARVE_S = float(os.environ.get("LUMINAGRID_STARVE_S", "60"))
#: Busy processes: twice the cores, so every core has a hog in its queue all the time.
HOGS = int(os.environ.get("LUMINAGRID_STARVE_HOGS", str(2 * (os.cpu_count() or 2))))
#: Their niceness (default 0, as the workers'; below 0 needs root): to explore harsher starvation.
HOG_NICE = int(os.environ.get("LUMINAGRID_STARVE_NICE", "0"))
JPEG_444 = [cv2.IMWRITE_JPEG_QUALITY, 95, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]

#: (op, params, channels, codec, whole-image OpenCV call), run in turn.
JOBS = [
    ("canny", {"low": 30, "high": 90}, 1, "lossless", lambda a: cv2.Canny(a, 30, 90)),
    ("gaussian", {"sigma": 3.0}, 3, "lossless", lambda a: cv2.GaussianBlur(a, (0, 0), 3.0)),
    ("bilateral", {"d": 7, "sigma_color": 40.0, "sigma_space": 10.0}, 1, "jpeg", lambda a: bilateral_filter(a, 7, 40.0, 10.0)),
    ("denoise", {"h": 5.0, "h_color": 5.0, "template_window": 5, "search_window": 9}, 3, "lossless",
     lambda a: cv2.fastNlMeansDenoisingColored(a, None, 5.0, 5.0, 5, 9)),
    ("median", {"ksize": 5}, 1, "lossless", lambda a: cv2.medianBlur(a, 5)),
    ("morph", {"mode": "gradient", "ksize": 5}, 3, "jpeg",
     lambda a: cv2.morphologyEx(a, cv2.MORPH_GRADIENT, np.ones((5, 5), np.uint8))),
]


@contextlib.contextmanager
def hogs(count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`count` unrelated processes that spin on the CPU; killed by PID on the way out, whatever happens."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            procs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL,
                                          preexec_fn=(lambda: os.nice(HOG_NICE)) if HOG_NICE else None))
        yield procs
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        for proc in procs:
            proc.wait(10)


class Lifetimes(threading.Thread):
    """Samples every worker's liveness record's PTTL (its remaining lifetime, by Redis's clock)."""

    def __init__(self, url: str, every_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.client = broker.client(url, timeout_s=5.0)
        self.every_s = every_s
        self.lowest: dict[str, int] = {}
        self.samples = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.every_s):
            with contextlib.suppress(Exception):
                nodes = sorted(n.decode() for n in self.client.smembers(NODES_KEY))
                with self.client.pipeline(transaction=False) as pipe:
                    for node in nodes:
                        pipe.pttl(ALIVE_KEY.format(node=node))
                    for node, pttl in zip(nodes, pipe.execute()):
                        self.lowest[node] = min(self.lowest.get(node, 10**9), int(pttl))  # -2: expired
                self.samples += 1


def test_a_cpu_starved_cluster_declares_no_live_worker_lost_and_stays_exact(plugin_site: Path, tmp_path: Path) -> None:
    runs_file = tmp_path / "runs.log"
    env = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(plugin_site)]),
           "LUMINAGRID_TEST_RUNS": str(runs_file)}
    with plugin_in_this_process(plugin_site), \
            LocalCluster(workers=2, concurrency=2, worker_env=env, worker_args=["--include", "faults"]) as c:
        use_broker(c.url)
        r = broker.client(c.url)
        assert r.llen(EVENTS_KEY) == 0
        sampler = Lifetimes(c.url)
        sampler.start()
        done: Counter[str] = Counter()
        with hogs(HOGS) as spinning:
            started = time.monotonic()
            try:
                n = 0
                while time.monotonic() - started < STARVE_S:
                    pending = []
                    for _ in range(2):  # two jobs in flight: both workers busy
                        op, params, channels, codec, call = JOBS[n % len(JOBS)]
                        image = synthetic(700 + n, 360, 300, channels)
                        job = luminagrid.submit(image, op=op, params=params, strips=6, codec=codec, quality=95)
                        pending.append((op, job, image, codec, call))
                        n += 1
                    for op, job, image, codec, call in pending:
                        result = job.wait(120)
                        source = image if codec == "lossless" else cv2.imdecode(cv2.imencode(
                            ".jpg", image, JPEG_444 if image.ndim == 3 else JPEG_444[:2])[1], cv2.IMREAD_UNCHANGED)
                        assert np.array_equal(result.image, call(source)), f"{op} job {job.id}"
                        done[op] += 1
                assert all(p.poll() is None for p in spinning)  # they starved the cluster all along
            finally:
                sampler.stopping.set()
                sampler.join(10)
                elapsed = time.monotonic() - started
        events = [e.decode() for e in r.lrange(EVENTS_KEY, 0, -1)]
        dead = c.dead()
    starts = Counter(x["task"] for x in faults.runs(runs_file) if x["what"] == "start")
    twice = {task: k for task, k in starts.items() if k > 1}
    late_ms = {node.split("@")[0]: DEFAULTS.liveness_ttl_s * 1000 - low for node, low in sampler.lowest.items()}
    print(f"\n{HOGS} busy processes (nice {HOG_NICE}) on {os.cpu_count()} cores for {elapsed:.0f} s: {sum(done.values())} jobs exact "
          f"({dict(done)}); {len(twice)} strips ran twice; {sampler.samples} PTTL samples; oldest liveness record "
          f"seen per worker (ms since its last beat; lost at {DEFAULTS.liveness_ttl_s * 1000:g}): {late_ms}")
    for event in events[:10]:
        print("  event:", event)
    assert not dead
    assert not [e for e in events if "is lost" in e], events
    assert not twice, twice
    if HOG_NICE >= 0:  # (hogs favoured over the cluster may leave too few jobs done to reach every operation)
        assert set(done) == {op for op, *_ in JOBS}
