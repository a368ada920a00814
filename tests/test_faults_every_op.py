"""Every operation survives real faults mid-strip, not only Canny: the built-ins (canny, gaussian,
bilateral, denoise) and the example plugin's (median, morph), installed with pip on the workers.

Each operation meets both faults, each proven to hit a strip in flight (its run record has a
"start" in the killed process and never an "end"; the same task ran again afterwards in another):
- a pool process SIGKILLed mid-strip: Celery retries the strip (1 s later) on a live process;
- a whole worker node SIGKILLed mid-strip (main process and pool: a lost node): the supervisor
  restores its strips within seconds, not the 3600 s visibility timeout; a replacement node
  starts meanwhile, as an orchestrator would start one.
Every output is compared pixel for pixel with the operation's whole-image OpenCV call (in JPEG
mode, on the JPEG-decoded whole image). One cluster serves the whole module.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

import cv2
import faults
import numpy as np
import pytest
from conftest import REPO, bilateral_filter, plugin_in_this_process, synthetic, wait_for

import luminagrid
from luminagrid import jobs
from luminagrid.app import use_broker
from luminagrid.local import LocalCluster, LocalWorker, wait_for_workers
from luminagrid.settings import Settings

DEFAULTS = Settings()
#: Long enough to find a strip running and kill it there; short enough to keep the module quick.
STRIP_DELAY_S = 0.3
#: A lost worker's strip must run again within this (liveness 2 s + a beat + the restore).
RERUN_BOUND_S = 5.0
#: And its job finish within this after the kill: seconds (supervision), with margin for a busy
#: 2-core machine (other tests, the replacement worker starting), never the visibility timeout.
DONE_BOUND_S = 10.0
JPEG_444 = [cv2.IMWRITE_JPEG_QUALITY, 95, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]


@dataclass(frozen=True)
class Case:
    params: dict[str, Any]
    channels: int
    codec: str
    #: the whole-image OpenCV call, on what the operation computes on
    reference: Callable[[np.ndarray], np.ndarray]


CASES = {
    "canny": Case({"low": 30, "high": 90}, 1, "lossless", lambda a: cv2.Canny(a, 30, 90)),
    "gaussian": Case({"sigma": 2.5}, 3, "jpeg", lambda a: cv2.GaussianBlur(a, (0, 0), 2.5)),
    "bilateral": Case({"d": 9, "sigma_color": 50.0, "sigma_space": 20.0}, 3, "lossless",
                      lambda a: bilateral_filter(a, 9, 50.0, 20.0)),
    "denoise": Case({"h": 7.0, "template_window": 5, "search_window": 11}, 1, "jpeg",
                    lambda a: cv2.fastNlMeansDenoising(a, None, 7.0, 5, 11)),
    "median": Case({"ksize": 7}, 3, "jpeg", lambda a: cv2.medianBlur(a, 7)),
    "morph": Case({"mode": "close", "ksize": 9}, 1, "lossless",
                  lambda a: cv2.morphologyEx(a, cv2.MORPH_CLOSE, np.ones((9, 9), np.uint8))),
}
HEIGHT, WIDTH, STRIPS = 240, 200, 6
_names = count(1)


def expected(case: Case, image: np.ndarray) -> np.ndarray:
    """The single-machine answer: in JPEG mode, on the whole image's JPEG, decoded."""
    if case.codec == "jpeg":
        image = cv2.imdecode(cv2.imencode(".jpg", image, JPEG_444 if case.channels == 3 else JPEG_444[:2])[1],
                             cv2.IMREAD_UNCHANGED)
    return case.reference(image)


@pytest.fixture(scope="module")
def runs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults-every-op") / "runs.log"


@pytest.fixture(scope="module")
def _cluster(plugin_site: Path, runs_file: Path) -> Iterator[LocalCluster]:
    """Redis and two worker nodes (two pool processes each) with the faults and the plugin; this
    process can submit the plugin's operations too."""
    env = {
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(plugin_site)]),
        "LUMINAGRID_TEST_STRIP_DELAY_S": str(STRIP_DELAY_S),
        "LUMINAGRID_TEST_RUNS": str(runs_file),
    }
    with plugin_in_this_process(plugin_site) as added, \
            LocalCluster(workers=2, concurrency=2, worker_env=env, worker_args=["--include", "faults"]) as c:
        assert added == ["median", "morph"]
        yield c


@pytest.fixture
def cluster(_cluster: LocalCluster) -> LocalCluster:
    use_broker(_cluster.url)
    live = live_nodes(_cluster)
    wait_for_workers([n.name for n in live], [n.proc for n in live if n.proc])
    return _cluster


def live_nodes(c: LocalCluster) -> list[LocalWorker]:
    return [n for n in c.nodes if n.proc is not None and n.proc.poll() is None]


def running(runs_file: Path, job: jobs.Job, pids: set[int] | None = None) -> dict[str, Any] | None:
    """A run of one of the job's strips that started and has not ended (in one of `pids`)."""
    return faults.unfinished(runs_file, job.id, pids)


def landed(runs_file: Path, doomed: dict[str, Any], killed_at: float) -> dict[str, Any]:
    """Proof that a kill hit a run in flight: that run never ended (its process is dead, so it
    never will), and the same strip ran again, in another process, after the kill. Returns that run."""
    runs = faults.runs(runs_file, doomed["task"])
    assert not [r for r in runs if r["what"] == "end" and r["pid"] == doomed["pid"] and r["t"] >= doomed["t"]], runs
    again = [r for r in runs if r["what"] == "start" and r["t"] > killed_at]
    assert again and again[0]["pid"] != doomed["pid"], runs
    return again[0]


def submit(op: str, seed: int) -> tuple[jobs.Job, np.ndarray]:
    case = CASES[op]
    image = synthetic(seed, HEIGHT, WIDTH, case.channels)
    job = luminagrid.submit(image, op=op, params=case.params, strips=STRIPS, codec=case.codec, quality=95)
    return job, expected(case, image)


@pytest.mark.parametrize("op", list(CASES))
def test_a_pool_process_sigkilled_mid_strip_is_retried_and_the_output_stays_exact(
    cluster: LocalCluster, runs_file: Path, op: str,
) -> None:
    job, want = submit(op, 500 + list(CASES).index(op))
    doomed = wait_for(lambda: running(runs_file, job), 30, f"a {op} strip to start")
    os.kill(doomed["pid"], signal.SIGKILL)
    killed_at = time.time()
    result = job.wait(60)
    again = landed(runs_file, doomed, killed_at)
    print(f"\n{op}: strip {doomed['task']} ran again {again['t'] - killed_at:.2f} s after its pool process was "
          f"SIGKILLed (pid {doomed['pid']} -> {again['pid']}, retry {again['retries']})")
    assert doomed["op"] == again["op"] == op
    assert again["retries"] >= 1  # Celery's retry of a lost pool process, counted
    assert np.array_equal(result.image, want)


@pytest.mark.parametrize("op", list(CASES))
def test_a_worker_node_sigkilled_mid_strip_is_recovered_within_seconds_and_the_output_stays_exact(
    cluster: LocalCluster, runs_file: Path, op: str,
) -> None:
    job, want = submit(op, 600 + list(CASES).index(op))

    def on_a_node() -> tuple[LocalWorker, dict[str, Any]] | None:
        for node in live_nodes(cluster):
            assert node.proc is not None
            found = running(runs_file, job, faults.pool_processes(node.proc.pid))
            if found:
                return node, found
        return None

    victim, doomed = wait_for(on_a_node, 30, f"a {op} strip to start on a worker node")
    assert victim.proc is not None
    os.killpg(victim.proc.pid, signal.SIGKILL)  # the node's main process and its pool: a lost node
    killed_at = time.time()
    # An orchestrator replaces a lost node; it starts while the supervisor recovers the strips.
    cluster.add_worker(f"replacement{next(_names)}@{os.uname().nodename}")
    result = job.wait(60)
    done_s = time.time() - killed_at
    again = landed(runs_file, doomed, killed_at)
    rerun_s = again["t"] - killed_at
    print(f"\n{op}: worker {victim.name} SIGKILLed mid-strip; strip {doomed['task']} ran again {rerun_s:.2f} s "
          f"later (pid {doomed['pid']} -> {again['pid']}); job done {done_s:.2f} s after the kill "
          f"(liveness {DEFAULTS.liveness_ttl_s:g} s, visibility timeout {DEFAULTS.visibility_timeout_s} s)")
    assert doomed["op"] == again["op"] == op
    assert np.array_equal(result.image, want)
    assert result.republished >= 1  # the supervisor restored it, not kombu's hour-long sweep
    assert rerun_s <= RERUN_BOUND_S and done_s <= DONE_BOUND_S
