"""The figures of issue 11 that bench/run.py adds to its tables: each measured side by side with
its single-process (or first-in-first-out, or Dask) counterpart in the same run.

- `help_wall`: `python cli.py --help` wall time;
- `timeline`: one job's time line (rows decoded, strips published, strips done, written);
- `small_behind_big`: a 640x480 job's latency while a big job runs, with job-size priorities
  and with every strip at one priority (first in, first out);
- `versus_dask`: a heavy operation on 2 workers vs Dask distributed `map_overlap` on 2 workers x
  1 thread, same strips and halo, outputs compared (needs the optional `bench` extra);
- `gigapixel`: a 40000x25000 gray PNG end to end: exact, the submitter's and workers' peak memory.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent

import luminagrid  # noqa: E402
from luminagrid import jobs, ops, queues, strips  # noqa: E402
from luminagrid import record as records  # noqa: E402
from luminagrid.local import LocalCluster  # noqa: E402
from luminagrid.settings import ACTIVE_JOBS_KEY, PROGRESS_KEY  # noqa: E402

# The CLI in-process, then its own peak memory (VmHWM: Linux carries ru_maxrss over exec).
PEAK_CLI = """
import runpy, sys
sys.argv = sys.argv[1:]
cli = runpy.run_path(sys.argv[0], run_name="cli")  # not __main__: its main_entry leaves by os._exit
try:
    cli["app"]()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
status = open("/proc/self/status").read()
print("VmHWM", int(status.split("VmHWM:")[1].split()[0]) * 1024, file=sys.stderr)
sys.exit(code)
"""
# One strip's whole task work in a fresh process (decode its payload, compute, pack): what a
# strip needs, as the growth of peak memory over the process after imports and a warm-up.
STRIP_NEEDS = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from luminagrid import codec, ops, strips
from luminagrid.codec import Codec
width, rows, halo = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
op = ops.get("canny"); values = op.values({})
sys.path.insert(0, sys.argv[1] + "/bench")
import cv2
from photos import photo_like
tiny = np.zeros((20, 20), np.uint8)
op.pack(op.compute(codec.decode_strip(codec.encode_strip(tiny, Codec.lossless, 0), Codec.lossless, 20, 20, 1), strips.plan_strips(20, 1, 8)[0], 20, values))
def hwm():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
gray = np.ascontiguousarray(cv2.cvtColor(photo_like(width, rows + 2 * halo), cv2.COLOR_BGR2GRAY))  # as the PNG's
payload = codec.encode_strip(gray, Codec.lossless, 0)
del gray
open("/proc/self/clear_refs", "w").write("5")  # the peak so far (building the input) is not the strip's
before = rss()
s = strips.Strip(index=1, row0=halo, row1=halo + rows, top=0, bottom=rows + 2 * halo)
pixels = codec.decode_strip(payload, Codec.lossless, rows + 2 * halo, width, 1)
packed = op.pack(op.compute(pixels, s, rows + 4 * halo, values))
print(hwm() - before)
"""


def help_wall(repeats: int) -> dict:
    """`python cli.py --help`, wall time (median of `repeats`, after one warm-up)."""
    argv = [sys.executable, str(REPO / "cli.py"), "--help"]
    subprocess.run(argv, check=True, capture_output=True)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return {"median_s": statistics.median(times), "min_s": min(times), "samples": times}


# --- one job's time line ---------------------------------------------------------------------------

def timeline(src: Path, out: Path, codec: str) -> dict:
    """Run one job on `src` as `cli.py submit` does (streamed in, streamed out) and note when
    rows were decoded, strips published, strips done, and the output written."""
    done_at: list[tuple[float, int]] = []
    stop = threading.Event()

    def watch(start: float) -> None:  # strips done, from the job's progress hash
        db = records.fast_client()
        last, job_id = 0, None
        while not stop.is_set():
            if job_id is None:  # the only active job: it is recorded before its first strip
                active = db.zrange(ACTIVE_JOBS_KEY, 0, -1)
                job_id = active[-1].decode() if active else None
            if job_id is not None:
                n = int(db.hlen(PROGRESS_KEY.format(job=job_id)))
                if n > last:  # (the hash is deleted once the output is written)
                    done_at.append((time.perf_counter() - start, n))
                    last = n
            time.sleep(0.002)

    started = time.perf_counter()
    watcher = threading.Thread(target=watch, args=(started,), daemon=True)
    watcher.start()
    try:
        job = luminagrid.submit(src, codec=codec)
        result = job.wait(300, forget=False, fetch=False)
        result.write(out)
        written = time.perf_counter() - started
        job.forget()
    finally:
        stop.set()
        watcher.join(5)
    stages = job.stages
    offset = stages.start - started  # the job's own clock starts at submit
    line = [(t + offset, what, v) for t, what, v in stages.timeline]
    read = [(t, v) for t, what, v in line if what == "read"]
    published = [(t, v) for t, what, v in line if what == "published"]
    return {
        "codec": codec, "strips": job.strip_count, "height": job.record.spec.height,
        "read": read, "published": published, "done": done_at,
        "marks": {
            "first rows decoded": read[0][0] if read else None,
            "first strip published": published[0][0] if published else None,
            "first strip done": done_at[0][0] if done_at else None,
            "last strip published": published[-1][0] if published else None,
            "last strip done": done_at[-1][0] if done_at else None,
            "written": written,
        },
    }


def timeline_chart(line: dict, path: Path, title: str) -> None:
    """Fractions done over time (rows decoded, strips published, strips done), with marks."""
    width_px, height_px, left, right, top, bottom = 1100, 460, 70, 30, 60, 110
    end = line["marks"]["written"] * 1.03
    img = np.full((height_px, width_px, 3), 255, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    plot_w, plot_h = width_px - left - right, height_px - top - bottom

    def xy(t: float, frac: float) -> tuple[int, int]:
        return left + int(t / end * plot_w), top + int((1 - frac) * plot_h)

    cv2.putText(img, title, (20, 35), font, 0.65, (0, 0, 0), 2)
    cv2.rectangle(img, (left, top), (left + plot_w, top + plot_h), (200, 200, 200), 1)
    step = 0.1 if end < 1.5 else 0.25 if end < 4 else 0.5 if end < 8 else 1.0
    t = 0.0
    while t <= end:
        x, _ = xy(t, 0)
        cv2.line(img, (x, top + plot_h), (x, top + plot_h + 5), (0, 0, 0), 1)
        cv2.putText(img, f"{t:g}", (x - 10, top + plot_h + 22), font, 0.45, (0, 0, 0), 1)
        t = round(t + step, 6)
    for frac in (0.0, 0.5, 1.0):
        _, y = xy(0, frac)
        cv2.putText(img, f"{frac:.0%}", (left - 48, y + 5), font, 0.45, (0, 0, 0), 1)
    cv2.putText(img, "seconds since submit", (left + plot_w // 2 - 80, top + plot_h + 45), font, 0.5, (0, 0, 0), 1)
    series = [("rows decoded", line["read"], line["height"], (180, 119, 31)),
              ("strips published", line["published"], line["strips"], (14, 127, 255)),
              ("strips done", line["done"], line["strips"], (44, 160, 44))]
    for i, (name, points, total, colour) in enumerate(series):
        pts = [xy(0, 0)] + [xy(t, v / total) for t, v in points]
        for a, b in zip(pts, pts[1:]):
            cv2.line(img, a, (b[0], a[1]), colour, 2)  # a step line: the count holds until it changes
            cv2.line(img, (b[0], a[1]), b, colour, 2)
        lx = left + 10 + i * 220
        cv2.rectangle(img, (lx, height_px - 40), (lx + 16, height_px - 24), colour, -1)
        cv2.putText(img, name, (lx + 22, height_px - 27), font, 0.5, (0, 0, 0), 1)
    written = line["marks"]["written"]
    x, _ = xy(written, 0)
    cv2.line(img, (x, top), (x, top + plot_h), (40, 39, 214), 2)
    cv2.putText(img, f"written {written:.2f} s", (min(x - 60, width_px - 170), top - 8), font, 0.5, (40, 39, 214), 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img)


# --- small jobs beside big ones --------------------------------------------------------------

def small_behind_big(big_wh: tuple[int, int], repeats: int) -> dict:
    """A 640x480 job's submit-to-result latency, submitted once a big job is 10 % done: with
    job-size priorities, and with both jobs' strips at the big job's priority (first in, first
    out). Both from this process, interleaved."""
    w, h = big_wh
    big_image = np.ascontiguousarray(cv2.cvtColor(_photo(w, h), cv2.COLOR_BGR2GRAY))
    small = np.ascontiguousarray(cv2.cvtColor(_photo(640, 480), cv2.COLOR_BGR2GRAY))
    idle = []
    for _ in range(5):
        luminagrid.submit(small).wait(30)
    for _ in range(10):
        started = time.perf_counter()
        luminagrid.submit(small).wait(30)
        idle.append(time.perf_counter() - started)
    own = queues.priority_for
    samples: dict[str, list[float]] = {"priorities": [], "first in, first out": []}
    big_s: list[float] = []
    for r in range(2 * repeats):
        mode = list(samples)[(r + (r // 2)) % 2]
        if mode == "first in, first out":
            queues.priority_for = lambda _pixels: queues.PRIORITY_STEPS[-1]  # every strip the same
        try:
            started = time.perf_counter()
            big = luminagrid.submit(big_image)
            _wait_done(big, big.strip_count // 10)
            t0 = time.perf_counter()
            luminagrid.submit(small).wait(600)
            samples[mode].append(time.perf_counter() - t0)
            big.wait(900)
            big_s.append(time.perf_counter() - started)
        finally:
            queues.priority_for = own
    return {
        "big": [w, h], "big_priority": own(w * h), "big_median_s": statistics.median(big_s),
        "idle_median_ms": statistics.median(idle) * 1e3,
        "median_ms": {k: statistics.median(v) * 1e3 for k, v in samples.items()}, "samples_s": samples,
    }


def _wait_done(job: jobs.Job, strips_done: int) -> None:
    db = records.fast_client()
    deadline = time.monotonic() + 300
    while int(db.hlen(PROGRESS_KEY.format(job=job.id))) < strips_done:
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job.id}: fewer than {strips_done} strips done after 300 s")
        time.sleep(0.005)


def _photo(w: int, h: int) -> np.ndarray:
    from photos import photo_like  # noqa: PLC0415

    return photo_like(w, h)


# --- Dask ---------------------------------------------------------------------------------------

def versus_dask(op_name: str, mode: str, width: int, height: int, repeats: int,
                interleaved: Callable[..., dict[str, list[float]]]) -> dict | None:
    """`luminagrid.submit(array, op=...).wait()` (lossless) vs Dask distributed `map_overlap`
    (2 worker processes x 1 thread, the same strips and halo), medians; None without Dask."""
    try:
        import dask.array as da  # noqa: PLC0415
        from dask.distributed import Client  # noqa: PLC0415
        from dask.distributed import LocalCluster as DaskCluster  # noqa: PLC0415
    except ImportError:
        return None
    op = ops.get(op_name)
    image = _photo(width, height)
    if op_name == "denoise":
        rng = np.random.default_rng(0)
        image = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
    image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if mode == "gray" else image
    values = op.values({})
    count = strips.default_strip_count(height, width, op.strip_pixels)
    plan = strips.plan_strips(height, count, strips.halo_for(op.halo_rows(values)))
    halo = strips.halo_for(op.halo_rows(values))
    rows = tuple(s.row1 - s.row0 for s in plan)
    whole = op.apply(image, values)
    outputs: dict[str, np.ndarray] = {}

    def block(piece: np.ndarray) -> np.ndarray:
        cv2.setNumThreads(1)  # as in luminagrid's workers
        from luminagrid import ops as worker_ops  # noqa: PLC0415

        return worker_ops.get(op_name).apply(np.ascontiguousarray(piece), values)

    with DaskCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.run(lambda: sys.path.insert(0, str(REPO)))

        def dask_run() -> None:
            chunks = (rows,) + tuple((n,) for n in image.shape[1:])
            arr = da.from_array(image, chunks=chunks)
            depth = {0: halo} | {i: 0 for i in range(1, image.ndim)}
            outputs["dask"] = arr.map_overlap(block, depth=depth, boundary="none", dtype=np.uint8).compute()

        def ours() -> None:
            outputs["luminagrid"] = luminagrid.submit(image, op=op_name, codec="lossless").wait(900).image

        samples = interleaved({"dask map_overlap": dask_run, "luminagrid": ours}, repeats)
    exact = {k: bool(np.array_equal(v, whole)) for k, v in outputs.items()}
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"op": op_name, "mode": mode, "size": [width, height], "strips": len(plan), "halo": halo,
            "median_s": med, "ratio": med["luminagrid"] / med["dask map_overlap"], "exact": exact,
            "samples_s": samples}


# --- a gigapixel ------------------------------------------------------------------------------------

def make_gray_png(path: Path, width: int, height: int) -> None:
    """A photo-like gray PNG of any size, written by libvips a band at a time (never whole)."""
    import pyvips  # noqa: PLC0415

    tile = pyvips.Image.new_from_file(str(REPO / "examples" / "coffee.png")).colourspace("b-w")[0]
    tile = tile.resize(2, kernel="cubic")
    quad = tile.join(tile.fliphor(), "horizontal")
    quad = quad.join(quad.flipver(), "vertical")
    big = quad.replicate(-(-width // quad.width), -(-height // quad.height)).crop(0, 0, width, height)
    big.cast("uchar").pngsave(str(path), compression=1)


def gigapixel(cluster: LocalCluster, work: Path, width: int, height: int) -> dict:
    """`cli.py submit` of a width x height gray PNG: exact, and peak memory of the submitter and
    of each worker's pool process, against what one strip's task needs in a fresh process."""
    src, out = work / f"giga-{width}x{height}.png", work / f"giga-{width}x{height}.edges.png"
    started = time.perf_counter()
    make_gray_png(src, width, height)
    made_s = time.perf_counter() - started
    env = {**os.environ, "LUMINAGRID_BROKER_URL": cluster.url, "LUMINAGRID_MAX_PIXELS": str(width * height)}
    pools = {n.name: _children(n.proc.pid) for n in cluster.nodes if n.proc is not None}
    for pid in (p for pids in pools.values() for p in pids):
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the pool processes' peak RSS to now
    before = {name: {pid: _status(pid, "VmRSS") for pid in pids} for name, pids in pools.items()}
    # Pool processes' RSS while strips run (until the last is done), apart from the end (the chord
    # join and the seam pass hold every strip's seam rows at once).
    during: dict[int, int] = {pid: 0 for pids in pools.values() for pid in pids}
    stop = threading.Event()

    def sample() -> None:
        db, job_id = records.fast_client(), None
        while not stop.is_set():
            if job_id is None:
                active = db.zrange(ACTIVE_JOBS_KEY, 0, -1)
                job_id = active[-1].decode() if active else None
            elif int(db.hlen(PROGRESS_KEY.format(job=job_id))) >= len(plan):
                return
            for pid in during:
                during[pid] = max(during[pid], _status(pid, "VmRSS"))
            time.sleep(0.02)

    plan = strips.plan_strips(height, strips.default_strip_count(height, width, ops.get("canny").strip_pixels),
                              strips.halo_for(2))
    from luminagrid.app import use_broker  # noqa: PLC0415

    use_broker(cluster.url)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK_CLI, str(REPO / "cli.py"), "submit", str(src), "-o", str(out),
                           "--codec", "lossless", "--timeout", "3600"], env=env, capture_output=True, text=True)
    job_s = time.perf_counter() - started
    stop.set()
    sampler.join(5)
    if proc.returncode:
        raise RuntimeError(f"gigapixel job failed ({proc.returncode}): {proc.stderr[-2000:]}")
    submitter_peak = int(proc.stderr.split("VmHWM")[-1].split()[0])
    workers = {name: {pid: _status(pid, "VmHWM") - before[name][pid] for pid in pids} for name, pids in pools.items()}
    strips_phase = {name: {pid: during[pid] - before[name][pid] for pid in pids} for name, pids in pools.items()}
    own_rows = max(s.row1 - s.row0 for s in plan)
    needs = int(subprocess.run([sys.executable, "-c", STRIP_NEEDS, str(REPO), str(width), str(own_rows),
                                str(plan[0].halo_bottom)], check=True, capture_output=True, text=True).stdout.split()[-1])
    expected = cv2.Canny(cv2.imread(str(src), cv2.IMREAD_GRAYSCALE), 100, 200)
    exact = bool(np.array_equal(cv2.imread(str(out), cv2.IMREAD_GRAYSCALE), expected))
    del expected
    src.unlink()
    out.unlink()
    worst = max(v for pids in workers.values() for v in pids.values())
    worst_strips = max(v for pids in strips_phase.values() for v in pids.values())
    return {"size": [width, height], "strips": len(plan), "strip_rows": own_rows, "make_png_s": made_s,
            "job_s": job_s, "exact": exact, "submitter_peak_mb": submitter_peak / 1e6,
            "worker_pool_peak_growth_mb": {n: {str(p): v / 1e6 for p, v in d.items()} for n, d in workers.items()},
            "worker_pool_growth_while_strips_run_mb": {n: {str(p): v / 1e6 for p, v in d.items()}
                                                        for n, d in strips_phase.items()},
            "strip_needs_mb": needs / 1e6, "worst_worker_vs_strip_needs": worst / max(needs, 1),
            "worst_worker_while_strips_run_vs_strip_needs": worst_strips / max(needs, 1)}


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _status(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(text.split(f"{field}:")[1].split()[0]) * 1024
