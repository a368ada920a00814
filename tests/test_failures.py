"""No workers, lost messages, bad input files and forged messages: clear outcomes, never a hang."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import cv2
import lz4.frame
import numpy as np
import pytest
from conftest import CLI, REPO, forged_jpeg, synthetic, wait_for

import luminagrid
from luminagrid import broker, ops
from luminagrid import record as records
from luminagrid.app import app, use_broker
from luminagrid.local import LocalCluster, LocalRedis, LocalWorker, wait_for_workers
from luminagrid.settings import QUEUE, STITCH_QUEUE, Settings
from luminagrid.tasks import republish_strip

RUN_TIMEOUT_S = 120


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


@pytest.fixture
def idle() -> Iterator[LocalCluster]:
    """A Redis with no workers yet (tests add them)."""
    with LocalCluster(workers=0) as c:
        use_broker(c.url)
        yield c


def env_for(c: LocalCluster) -> dict[str, str]:
    return {**os.environ, "LUMINAGRID_BROKER_URL": c.url}


# --- no workers -------------------------------------------------------------------------------


def test_with_no_workers_submit_says_so_then_the_job_can_be_collected_later(idle: LocalCluster, tmp_path: Path) -> None:
    photo = tmp_path / "photo.png"
    cv2.imwrite(str(photo), synthetic(41, 120, 90))
    started = time.monotonic()
    proc = run(["submit", str(photo), "--timeout", "5", "--codec", "lossless", "--strips", "3"], env_for(idle))
    elapsed = time.monotonic() - started
    assert proc.returncode == 1
    assert f"no workers are consuming queue '{QUEUE}' at {idle.url} (workers online: 0)" in proc.stderr
    assert "did not finish within 5 s (0/3 strips done, 3 queued)" in proc.stderr
    job_id = proc.stderr.split("python cli.py result ")[1].split()[0]
    assert elapsed < 5 + 8  # interpreter start + the timeout + cleanup
    assert not photo.with_name("photo.edges.png").exists()

    status = run(["status", job_id], env_for(idle))
    assert status.returncode == 0 and f"job {job_id}: queued | 0/3 strips done" in status.stdout

    idle.add_worker(f"late@{os.uname().nodename}")
    collected = run(["result", job_id], env_for(idle))
    assert collected.returncode == 0, collected.stderr
    out = photo.with_name("photo.edges.png")  # the path submit had chosen
    gray = cv2.imread(str(photo), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(cv2.imread(str(out), cv2.IMREAD_UNCHANGED), cv2.Canny(gray, 100, 200))
    assert f"job {job_id} 90x120 canny -> {out}" in collected.stdout

    gone = run(["status", job_id], env_for(idle))  # collected jobs are deleted from Redis
    assert gone.returncode == 1 and f"no job '{job_id}'" in gone.stderr


def test_status_and_result_of_an_unknown_job_fail_clearly(idle: LocalCluster) -> None:
    for command in ("status", "result"):
        proc = run([command, "no-such-job"], env_for(idle))
        assert proc.returncode == 1
        assert "no job 'no-such-job'" in proc.stderr and "Traceback" not in proc.stderr


def test_a_redis_that_is_gone_for_good_fails_submit_within_its_timeout(tmp_path: Path) -> None:
    photo = tmp_path / "photo.png"
    cv2.imwrite(str(photo), synthetic(42, 64, 64))
    with LocalCluster(workers=0) as c:
        proc = subprocess.Popen([*CLI, "submit", str(photo), "--timeout", "4"], env=env_for(c),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: broker.client(c.url).llen(QUEUE) > 0, 30, "the job to be queued")
        finally:
            c.redis.stop()
        started = time.monotonic()
        _, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 1
    assert f"Redis at {c.url} has not answered for" in stderr and "did not finish within 4 s" in stderr
    assert time.monotonic() - started < 4 + 5
    assert "Traceback" not in stderr and not photo.with_name("photo.edges.png").exists()


# --- the supervisor: lost messages and chord joins ------------------------------------------------

FIND_AND_DROP_LUA = """
for _, v in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  if string.find(v, '"' .. ARGV[1] .. '"', 1, true) then return redis.call('LREM', KEYS[1], 1, v) end
end
return 0
"""


def test_a_strip_message_lost_while_nobody_waits_is_published_again_by_the_cluster(tmp_path: Path) -> None:
    with LocalCluster(workers=0, appendonly=True) as c:
        use_broker(c.url)
        image = synthetic(43, 200, 150)
        job_id = luminagrid.submit(image, strips=4, codec="lossless", low=30, high=90).id  # nobody waits for it
        # As a Redis restart can lose a message a worker was taking; then the Redis restart itself.
        assert broker.client(c.url).eval(FIND_AND_DROP_LUA, 1, QUEUE, f"{job_id}.strip2") == 1
        assert c.redis is not None
        c.redis.restart()
        c.add_worker(f"w@{os.uname().nodename}")  # its supervisor looks once on taking over
        collected = run(["result", job_id, "-o", str(tmp_path / "out.png")], env_for(c))
    assert collected.returncode == 0, collected.stderr
    assert np.array_equal(cv2.imread(str(tmp_path / "out.png"), cv2.IMREAD_UNCHANGED), cv2.Canny(image, 30, 90))
    assert "1 recovery(ies) by the supervisor" in collected.stdout


def test_a_hundred_lost_strips_of_one_job_are_each_published_again_and_the_job_completes(tmp_path: Path) -> None:
    """Many recoveries in one job are not "something keeps losing it": only a task lost again and
    again fails its job."""
    with LocalCluster(workers=0) as c:
        use_broker(c.url)
        log = tmp_path / "worker.log"
        # A worker that takes only stitches, so the strips stay queued until we drop them.
        worker = LocalWorker(f"w@{os.uname().nodename}", c.url, extra_args=["--queues", STITCH_QUEUE], log_path=log)
        try:
            worker.start()
            wait_for_workers([worker.name], [worker.proc])
            image = synthetic(45, 800, 64)
            job = luminagrid.submit(image, strips=100, codec="lossless", low=30, high=90)
            client = broker.client(c.url)
            wait_for(lambda: client.llen(QUEUE) == 100, 30, "the strips to be queued")
            assert client.delete(QUEUE) == 1  # every strip message lost
            records.request_walk("test: the queue was dropped")
            wait_for(lambda: client.llen(QUEUE) == 100, 30, "the supervisor to publish the 100 strips again")
            app.control.add_consumer(QUEUE, destination=[worker.name], reply=True)
            result = job.wait(120, forget=False)
            events = job.status().events
            job.forget()
        finally:
            worker.stop()
    assert np.array_equal(result.edges, cv2.Canny(image, 30, 90))
    assert sum("was lost (found nowhere); published it again" in e for e in events) == 100


def test_a_lost_chord_join_is_finished_by_publishing_the_stitch_again(idle: LocalCluster) -> None:
    image = synthetic(44, 150, 150)
    job = luminagrid.submit(image, strips=3, codec="lossless", low=30, high=90)
    client = broker.client(idle.url)
    assert client.delete(f"celery-taskset-meta-{job.group_id}.s") == 1  # the chord never fires now
    # A duplicate of a strip, as a redelivery would make: it must not count twice.
    republish_strip(job.record, 0)
    idle.add_worker(f"w@{os.uname().nodename}")
    result = job.wait(30, forget=False)
    assert np.array_equal(result.edges, cv2.Canny(image, 30, 90))
    events = job.status().events
    assert any("every strip is done but its stitch was nowhere; published the stitch again" in e for e in events), events
    job.forget()


def test_the_supervisor_looks_for_messages_in_the_brokers_redis_not_the_backends(tmp_path: Path) -> None:
    queues, results = LocalRedis(tmp_path / "broker").start(), LocalRedis(tmp_path / "backend").start()
    # A worker that takes only stitches: its supervisor runs while the strips stay queued.
    log = tmp_path / "worker.log"
    worker = LocalWorker(f"split@{os.uname().nodename}", queues.url, extra_env={"LUMINAGRID_RESULT_BACKEND": results.url},
                         extra_args=["--queues", STITCH_QUEUE, "--loglevel", "WARNING"], log_path=log)
    try:
        use_broker(queues.url, results.url)
        image = synthetic(50, 120, 100)
        job = luminagrid.submit(image, strips=3, codec="lossless", low=30, high=90)
        worker.start()
        wait_for_workers([worker.name], [worker.proc])
        wait_for(lambda: "looked for lost messages" in log.read_text(), 30, "the look on taking over")
        for n in range(3):  # queued messages are not "lost", however often it looks
            records.request_walk(f"test look {n}")
            wait_for(lambda: f"looked for lost messages (test look {n})" in log.read_text(), 30, f"look {n}")
        assert "3 unfinished strip(s) not held, 3 queued, 0 not found" in log.read_text()
        assert broker.client(queues.url).llen(QUEUE) == 3 and not job.status().events
        app.control.add_consumer(QUEUE, destination=[worker.name], reply=True)
        assert np.array_equal(job.wait(30).edges, cv2.Canny(image, 30, 90))
    finally:
        worker.stop()
        queues.stop()
        results.stop()


# --- bad input files --------------------------------------------------------------------------


def truncated(ext: str):  # noqa: ANN201
    def make(d: Path) -> Path:
        path = d / f"cut{ext}"
        ok, buf = cv2.imencode(ext, synthetic(45, 200, 200, channels=3))
        path.write_bytes(buf.tobytes()[: buf.size // 2])
        return path
    return make


def bomb(d: Path) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 200_000, 200_000, 8, 0, 0, 0, 0)
    path = d / "bomb.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b""))
    return path


def random_bytes(d: Path) -> Path:
    path = d / "noise.jpg"
    path.write_bytes(np.random.default_rng(46).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (truncated(".png"), "the PNG is damaged or truncated"),
        (truncated(".jpg"), "the JPEG is damaged or truncated"),
        (random_bytes, "not a readable image"),
        (bomb, "its header declares more pixels than the limit of 250000000 (a decompression bomb"),
    ],
)
def test_damaged_and_hostile_files_fail_with_a_clear_message(
    cluster_env: dict[str, str], tmp_path: Path, make, message: str,  # noqa: ANN001
) -> None:
    path = make(tmp_path)
    before = sorted(tmp_path.iterdir())
    proc = run(["submit", str(path)], cluster_env)
    assert proc.returncode == 1
    assert f"error: {path}: " in proc.stderr and message in proc.stderr
    assert "Traceback" not in proc.stderr and "libpng" not in proc.stderr.replace("(libpng error", "")
    assert sorted(tmp_path.iterdir()) == before


def test_an_image_over_the_pixel_limit_is_refused(cluster_env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    cv2.imwrite(str(path), synthetic(47, 200, 100))
    proc = run(["submit", str(path)], {**cluster_env, "LUMINAGRID_MAX_PIXELS": "10000"})
    assert proc.returncode == 1
    assert "over the limit of 10000" in proc.stderr or "more pixels than the limit of 10000" in proc.stderr
    assert "LUMINAGRID_MAX_PIXELS" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.png"]


#: How a user reaches luminagrid first; each must set OpenCV's pixel limit before cv2 is imported.
ENTRY_POINTS = {
    "import luminagrid": "import luminagrid",
    "a submodule directly": "import luminagrid.codec",
    "celery -A luminagrid": "from celery.app.utils import find_app; find_app('luminagrid')",  # what -A does
    "cli.py": f"import sys; sys.path.insert(0, {str(REPO)!r}); import cli",
}
#: Run in a fresh interpreter after the entry point: is the limit in force in OpenCV itself?
PIXEL_LIMIT_PROBE = """
import os, sys
assert "cv2" not in sys.modules or os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS") == "1000000", "cv2 came first"
import cv2, numpy as np
assert os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] == "1000000", os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS")
assert cv2.imdecode(cv2.imencode(".png", np.zeros((1000, 1000), np.uint8))[1], cv2.IMREAD_UNCHANGED).shape == (1000, 1000)
try:
    cv2.imdecode(cv2.imencode(".png", np.zeros((1001, 1000), np.uint8))[1], cv2.IMREAD_UNCHANGED)
except cv2.error as exc:
    assert "CV_IO_MAX_IMAGE_PIXELS" in str(exc), exc
else:
    raise AssertionError("OpenCV decoded a 1001x1000 image over a limit of 1000000 pixels")
"""


def _fresh_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LUMINAGRID_", "OPENCV_"))}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_opencv_refuses_an_image_over_the_pixel_limit_however_luminagrid_is_entered(entry: str) -> None:
    proc = _fresh_python(f"{ENTRY_POINTS[entry]}\n{PIXEL_LIMIT_PROBE}", LUMINAGRID_MAX_PIXELS="1000000")
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_opencv_gets_the_default_pixel_limit_when_another_setting_is_invalid() -> None:
    """The bad setting is reported where settings are read; OpenCV must not go unlimited meanwhile."""
    proc = _fresh_python("import os, sys, luminagrid.codec\nprint(os.environ['OPENCV_IO_MAX_IMAGE_PIXELS'])",
                         LUMINAGRID_INLINE_MAX_BYTES="lots")
    assert proc.returncode == 0 and proc.stdout.split() == [str(Settings.max_pixels)], proc.stderr[-2000:]


def test_an_unwritable_output_path_fails_cleanly_and_leaves_the_workers_healthy(
    cluster: LocalCluster, cluster_env: dict[str, str], tmp_path: Path,
) -> None:
    path = tmp_path / "photo.png"
    cv2.imwrite(str(path), synthetic(48, 64, 64))
    for out, message in ((Path("/proc/edges.png"), "cannot write there"), (tmp_path / "no" / "e.png", "does not exist")):
        proc = run(["submit", str(path), "-o", str(out)], cluster_env)
        assert proc.returncode == 1
        assert f"error: {out.parent if 'exist' in message else out}" in proc.stderr and message in proc.stderr
        assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png"]
    assert len(app.control.ping(timeout=2.0)) == 2


# --- forged messages --------------------------------------------------------------------------

JOB = {"id": "forged", "op": "canny", "params": {"low": 10.0, "high": 20.0}, "width": 16, "height": 16, "channels": 1,
       "strips": 1, "codec": "lossless", "quality": 95, "package": "luminagrid", "version": ops.origin("canny").version,
       "halo_rows": 8, "fields": list(ops.get("canny").fields)}
STRIP = {"index": 0, "row0": 0, "row1": 16, "top": 0, "bottom": 16}


class Exploit:
    """Unpickling this runs `touch MARKER`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(
    ("job", "strip", "payload", "message"),
    [
        (JOB, STRIP, b"\x04garbage", "not valid LZ4"),
        (JOB, STRIP, lz4.frame.compress(bytes(8 * 16)), "holds 128 bytes, expected 16x16"),
        (JOB, STRIP, lz4.frame.compress(bytes(10_000_000)), "holds more than 256 bytes"),  # a bomb that fits the size check
        (JOB, STRIP, b"\0" * 70_000, "exceeds"),
        ({**JOB, "codec": "jpeg"}, STRIP, b"\xff\xd8\xff garbage", "JPEG strip has no frame header"),
        # 64 KB declaring 15000x15000: refused by its header, before OpenCV allocates 675 MB for it.
        ({**JOB, "codec": "jpeg"}, STRIP, forged_jpeg(15000, 15000, pad_bytes=64 * 1024 - 400),
         "JPEG strip declares 15000x15000 pixels with 1 component(s), expected 16x16 with 1"),
        ({**JOB, "width": 10**6, "height": 10**6}, STRIP, b"", "exceeds the pixel limit"),
        (JOB, {**STRIP, "top": 5}, b"", "are inconsistent"),
        (JOB, {**STRIP, "row1": "16"}, b"", "'row1' = '16' is not a whole number"),
        ("not a dict", STRIP, b"", "job must be a mapping"),
        ({**JOB, "op": "Sharpen!"}, STRIP, b"", "operation 'Sharpen!' is not an operation's name"),
        ({**JOB, "halo_rows": 7}, STRIP, b"", "halo_rows 7 is not a multiple of 8"),
        ({**JOB, "halo_rows": 10**6}, STRIP, b"", "'halo_rows' = 1000000 is not a whole number"),
        ({**JOB, "version": ["1"]}, STRIP, b"", "are not a package's name and version"),
        ({**JOB, "fields": "edges"}, STRIP, b"", "is not a list of 1-16 field names"),
        ({**JOB, "op": "gaussian", "params": {"sigma": 1e9}, "fields": ["pixels"]}, STRIP, b"", "parameter sigma=1000000000.0 is out of range"),
        ({**JOB, "params": {"low": 10.0}}, STRIP, b"", "are not every parameter of canny"),
        ({**JOB, "params": {"low": "10", "high": 20.0}}, STRIP, b"", "are not every parameter of canny, each of its type"),
        ({**JOB, "params": {"low": b"10", "high": 20.0}}, STRIP, b"", "is not a mapping of names to numbers or short words"),
        ({**JOB, "channels": 3}, STRIP, b"", "3 channels do not suit operation canny"),
        ({**JOB, "op": "gaussian", "params": {"sigma": 2.0}, "channels": 3, "fields": ["pixels"]}, STRIP, b"\0" * 70_000,
         "exceeds 66304"),
        (JOB, STRIP, "not bytes", "payload is str, not bytes"),
        (JOB, STRIP, {"claim": "luminagrid:in:another:0:payload"}, "claim 'luminagrid:in:another:0:payload' is not this strip's"),
        (JOB, STRIP, {"claim": "luminagrid:in:forged:0:payload", "more": 1}, "payload is dict, not bytes or a claim"),
        ({**JOB, "file": "yes"}, STRIP, b"", "field 'file' = 'yes' is not a bool"),
        ({**JOB, "file": True, "strips": 2}, STRIP, b"", "true only for 1 strip"),
        ({**JOB, "file": True}, STRIP, b"\0" * 100_000, "exceeds 69632"),  # a file over 16 bytes per pixel
    ],
)
def test_forged_strip_messages_are_rejected_without_harming_the_workers(
    cluster: LocalCluster, job: object, strip: object, payload: object, message: str,
) -> None:
    result = app.send_task("luminagrid.strip", args=[job, strip, payload])
    meta = wait_for(lambda: (m := records.metas([result.id])[0]) and m["status"] == "FAILURE" and m, 30, "the task to fail")
    assert "MessageError" in type(meta["result"]).__name__ and message in str(meta["result"])
    assert len(app.control.ping(timeout=2.0)) == 2


@pytest.mark.parametrize(
    ("job", "message"),
    [
        ({**JOB, "version": "0.0.1"}, f"has operation 'canny' from luminagrid {ops.origin('canny').version}, but the job "
                                      "was submitted with luminagrid 0.0.1; every node must run the same version"),
        ({**JOB, "package": "other-ops"}, f"but the job was submitted with other-ops {JOB['version']}; every node must run "
                                          "the same package and version"),
        ({**JOB, "halo_rows": 16}, "asks for a halo of 8 rows and fields ['edges', 'pending', 'seam_pending', 'first', "
                                   "'last', 'labels'], but the job was cut with 16 rows"),
        ({**JOB, "op": "sharpen"}, "has no operation 'sharpen', which the submitter's luminagrid "),
        ({**JOB, "op": "sharpen", "package": "Sharp_Ops", "version": "2.0"},
         "has no operation 'sharpen': the job was submitted with it from package Sharp_Ops 2.0; install that package on "
         "every worker (pip install 'Sharp_Ops==2.0') and restart them"),
    ],
)
def test_a_message_from_other_code_is_refused_naming_the_worker_and_both_versions(
    cluster: LocalCluster, job: dict, message: str,
) -> None:
    result = app.send_task("luminagrid.strip", args=[job, STRIP, b""])
    meta = wait_for(lambda: (m := records.metas([result.id])[0]) and m["status"] == "FAILURE" and m, 30, "the task to fail")
    assert type(meta["result"]).__name__ == "OperationUnavailable"
    assert message in str(meta["result"]) and str(meta["result"]).startswith("worker local")
    assert len(app.control.ping(timeout=2.0)) == 2


def test_a_strip_whose_payload_is_gone_and_whose_job_is_unknown_is_dropped_without_harm(cluster: LocalCluster) -> None:
    """Its job expired, was collected, or never existed: nobody waits for it, and it must not hang."""
    job = {**JOB, "id": f"gone-{os.getpid()}-{time.monotonic_ns()}"}
    claim = {"claim": f"luminagrid:in:{job['id']}:0:payload"}
    result = app.send_task("luminagrid.strip", args=[job, STRIP, claim])

    def dropped() -> bool:
        return any(f"job {job['id']} is not in Redis" in n.log_path.read_text(errors="replace")
                   for n in cluster.nodes if n.log_path)
    wait_for(dropped, 30, "a worker to drop the message, with a warning")
    client = broker.client(cluster.url)
    wait_for(lambda: client.hlen("unacked") == 0, 30, "the message to be acknowledged")
    assert records.metas([result.id])[0] is None  # no result stored, not even STARTED
    assert len(app.control.ping(timeout=2.0)) == 2


def test_a_pickled_message_is_never_unpickled(cluster: LocalCluster, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    pids = sorted(n.proc.pid for n in cluster.nodes if n.proc)
    app.send_task("luminagrid.strip", args=[Exploit(marker)], serializer="pickle")
    client = broker.client(cluster.url)
    wait_for(lambda: client.llen(QUEUE) == 0 and client.hlen("unacked") == 0, 30, "the message to be consumed")
    assert not marker.exists()
    assert sorted(n.proc.pid for n in cluster.nodes if n.proc and n.proc.poll() is None) == pids
    healthy = synthetic(49, 80, 80)
    assert np.array_equal(luminagrid.submit(healthy, codec="lossless", low=30, high=90).wait(30).edges,
                          cv2.Canny(healthy, 30, 90))
