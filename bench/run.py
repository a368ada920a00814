"""End-to-end benchmark: luminagrid vs the single-machine limit, ratios from one run.

    python bench/run.py            # 7680x4320, 5 repeats, every figure (about 4 minutes)
    python bench/run.py --quick    # 3 repeats, fewer latency samples (under 3 minutes)
    python bench/run.py --size 3840x2160 --size 7680x4320 --codec lossless --repeats 7

Starts its own Redis and 2 local workers (one pool process each; warmed up), builds photo-like
inputs from examples/coffee.png (mirror-tiled at 2x: real edges and texture, not noise), then
measures, interleaving candidates so machine drift hits all alike:

1. per size: the in-process baseline (read + gray + cv2.Canny, OpenCV's default threading) vs
   `luminagrid.submit(path).wait()` per codec, with per-stage timing; the whole-process script
   (read + gray + Canny + write) vs `python cli.py submit`; the original socket prototype's design
   (bench/prototype.py, 2 workers) vs luminagrid jpeg;
2. 640x480 submit-to-result latency, warm workers (an array, so no file read);
3. the submitter's peak RSS at the largest size, in a fresh process;
4. worker RSS (main + pool process) after 20 and after 200 1920x1080 jobs;
5. `cli.py --help` wall time; the worker's exact Canny strip step vs `cv2.Canny` on the same
   strips (bench/canny_strip.py); one 8K job's time line (rows decoded, strips published, strips
   done, written) as a chart; a canny batch of 50 1080p PNGs vs a one-process loop (bench/ops.py);
   a 640x480 job's latency behind a 250 MP job, with priorities and first in, first out;
   bilateral colour and denoise gray at 3840x2160 vs Dask distributed `map_overlap` (when the
   optional `bench` extra is installed: pip install -e '.[bench]');
6. unless --quick or --no-gigapixel: a 40000x25000 gray PNG through `cli.py submit`, exact,
   with the submitter's and the workers' peak memory (bench/figures.py).

Prints tables of medians and ratios, writes JSON and charts (PNG) under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import canny_strip  # noqa: E402
import figures  # noqa: E402
import prototype  # noqa: E402
from photos import photo_like  # noqa: E402

import luminagrid  # noqa: E402
from luminagrid import jobs  # noqa: E402
from luminagrid.local import LocalCluster, free_port, spawn, wait_until_ready  # noqa: E402
from luminagrid.stages import ORDER, Stages  # noqa: E402

TARGETS = {
    "api lossless": 0.90,  # vs the in-process baseline
    "cli lossless": 1.00,  # vs the whole-process script
    "latency_ms": 20.0,
    "worker_rss_growth": 0.10,
}
SCRIPT = """
import sys, cv2
img = cv2.imread(sys.argv[1], cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
cv2.imwrite(sys.argv[2], cv2.Canny(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), 100, 200))
"""
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through fork and exec.
PEAK_RSS = """
import sys
sys.path.insert(0, sys.argv[3])
import luminagrid
luminagrid.submit(sys.argv[1], codec=sys.argv[2]).wait(300)
status = open("/proc/self/status").read()
print(int(status.split("VmHWM:")[1].split()[0]) * 1024)
"""


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(
    candidates: dict[str, Callable[[], object]], repeats: int,
    setups: dict[str, Callable[[], object]] | None = None,
) -> dict[str, list[float]]:
    """Warm every candidate up once, then time each `repeats` times in a rotating order.

    `setups[name]`, if given, runs before each call of that candidate, untimed.
    """
    setups = setups or {}
    for name, fn in candidates.items():
        setups.get(name, lambda: None)()
        fn()
    names = list(candidates)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            setups.get(name, lambda: None)()
            samples[name].append(timed(candidates[name]))
    return samples


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port)).close()
    except OSError:
        return False
    return True


def rss_bytes(pid: int) -> int:
    """Resident memory of `pid` and its children (a worker's main and pool processes)."""
    total = 0
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for p in [pid, *map(int, children)]:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def measure_size(cluster: LocalCluster, work: Path, width: int, height: int, codecs: list[str],
                 repeats: int, ports: list[int]) -> dict:
    src = work / f"input-{width}x{height}.png"
    cv2.imwrite(str(src), photo_like(width, height))
    out = work / "out.png"
    env = {**os.environ, "LUMINAGRID_BROKER_URL": cluster.url}
    stage_samples: dict[str, list[Stages]] = {codec: [] for codec in codecs}

    def baseline() -> None:
        img = cv2.imread(str(src), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
        cv2.Canny(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), 100, 200)

    def api(codec: str) -> Callable[[], None]:
        def run() -> None:
            stage_samples[codec].append(luminagrid.submit(src, codec=codec).wait(300).stages)
        return run

    def process(argv: list[str]) -> Callable[[], None]:
        return lambda: subprocess.run(argv, env=env, check=True, capture_output=True)

    master = prototype.Master(ports)
    try:
        candidates: dict[str, Callable[[], object]] = {"baseline (in-process)": baseline}
        candidates |= {f"api {codec}": api(codec) for codec in codecs}
        candidates["prototype (in-process)"] = lambda: master.run(src)
        candidates["script (process)"] = process([sys.executable, "-c", SCRIPT, str(src), str(out)])
        candidates |= {
            f"cli {codec}": process([sys.executable, str(REPO / "cli.py"), "submit", str(src), "-o", str(out),
                                     "--codec", codec])
            for codec in codecs
        }
        samples = interleaved(candidates, repeats)
    finally:
        master.close()
    for codec in codecs:
        del stage_samples[codec][0]  # the warm-up
    medians = {name: statistics.median(v) for name, v in samples.items()}

    def versus(name: str) -> str:
        if name.startswith("cli"):
            return "script (process)"
        if name.startswith("prototype"):
            return "api jpeg" if "api jpeg" in medians else "baseline (in-process)"
        return "baseline (in-process)"

    rows = [
        {"candidate": name, "median_s": medians[name], "min_s": min(v), "max_s": max(v),
         "vs": versus(name), "ratio": medians[name] / medians[versus(name)], "target": TARGETS.get(name)}
        for name, v in samples.items()
    ]
    stages = {
        codec: {
            name: statistics.median(s.seconds.get(name, 0.0) for s in runs)
            for name in ORDER if any(name in s.seconds for s in runs)
        } | {f"workers {k} (sum)": statistics.median(s.worker_seconds.get(k, 0.0) for s in runs)
             for k in ("decode", "compute", "pack")}
        for codec, runs in stage_samples.items()
    }
    return {"size": [width, height], "rows": rows, "stages": stages, "samples": samples}


def latency(samples_n: int) -> dict:
    image = cv2.cvtColor(photo_like(640, 480), cv2.COLOR_BGR2GRAY)
    out = {}
    for codec in ("jpeg", "lossless"):
        for _ in range(5):  # warm-up
            luminagrid.submit(image, codec=codec).wait(30)
        times = [timed(lambda c=codec: luminagrid.submit(image, codec=c).wait(30)) for _ in range(samples_n)]
        out[codec] = {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3,
                      "max_ms": max(times) * 1e3, "samples": len(times)}
    return out


def submitter_rss(cluster: LocalCluster, work: Path, width: int, height: int) -> dict:
    src = work / f"input-{width}x{height}.png"
    env = {**os.environ, "LUMINAGRID_BROKER_URL": cluster.url}
    bgr_bytes = width * height * 3
    limit = 2.5 * bgr_bytes + 150e6
    out = {"image_bgr_mb": bgr_bytes / 1e6, "limit_mb": limit / 1e6}
    for codec in ("jpeg", "lossless"):
        proc = subprocess.run([sys.executable, "-c", PEAK_RSS, str(src), codec, str(REPO)], env=env, check=True,
                              capture_output=True, text=True)
        out[f"peak_mb_{codec}"] = int(proc.stdout.split()[-1]) / 1e6
    return out


def worker_rss(cluster: LocalCluster, jobs_total: int) -> dict:
    image = cv2.cvtColor(photo_like(1920, 1080), cv2.COLOR_BGR2GRAY)
    pids = {n.name: n.proc.pid for n in cluster.nodes if n.proc is not None}
    after: dict[int, dict[str, int]] = {}
    in_flight: list[jobs.Job] = []
    for n in range(1, jobs_total + 1):
        in_flight.append(luminagrid.submit(image, codec="lossless" if n % 2 else "jpeg"))
        if len(in_flight) == 4 or n == jobs_total:
            for job in in_flight:
                job.wait(60)
            in_flight = []
        if n in (20, jobs_total):
            after[n] = {name: rss_bytes(pid) for name, pid in pids.items()}
    growth = {name: after[jobs_total][name] / after[20][name] - 1 for name in pids}
    return {"jobs": jobs_total, "size": [1920, 1080],
            "rss_mb_after_20": {k: v / 1e6 for k, v in after[20].items()},
            f"rss_mb_after_{jobs_total}": {k: v / 1e6 for k, v in after[jobs_total].items()},
            "growth": growth, "max_growth": max(growth.values())}


def chart(sizes: list[dict], path: Path) -> None:
    """Horizontal stacked bars: median seconds per stage, per size and codec, drawn with OpenCV."""
    colours = {"read": (180, 119, 31), "convert": (232, 199, 174), "encode": (14, 127, 255), "publish": (120, 187, 255),
               "compute": (44, 160, 44), "stitch": (40, 39, 214), "collect": (189, 103, 148), "write": (75, 86, 140)}
    bars = []
    for size in sizes:
        w, h = size["size"]
        base = next(r for r in size["rows"] if r["candidate"] == "baseline (in-process)")["median_s"]
        bars.append((f"{w}x{h} baseline", [], base))
        for codec, stages in size["stages"].items():
            parts = [(name, stages[name]) for name in ORDER if name in stages]
            bars.append((f"{w}x{h} {codec}", parts, sum(s for _, s in parts)))
    longest = max(total for _, _, total in bars) or 1.0
    left, right, row_h, top = 260, 90, 44, 60
    width_px = 1100
    img = np.full((top + row_h * len(bars) + 90, width_px, 3), 255, np.uint8)
    scale = (width_px - left - right) / longest
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(img, "luminagrid: median seconds per stage (submitter's wall clock)", (20, 35), font, 0.7, (0, 0, 0), 2)
    for i, (label, parts, total) in enumerate(bars):
        y = top + i * row_h
        cv2.putText(img, label, (20, y + 26), font, 0.55, (0, 0, 0), 1)
        if label.endswith("baseline"):
            cv2.rectangle(img, (left, y + 8), (left + int(total * scale), y + 34), (160, 160, 160), -1)
        x = left
        for name, seconds in parts:
            x1 = x + int(round(seconds * scale))
            cv2.rectangle(img, (x, y + 8), (x1, y + 34), colours.get(name, (128, 128, 128)), -1)
            x = x1
        cv2.putText(img, f"{total:.2f} s", (left + int(total * scale) + 6, y + 27), font, 0.5, (0, 0, 0), 1)
    x, y = 20, top + row_h * len(bars) + 30
    for name in ORDER:
        cv2.rectangle(img, (x, y - 12), (x + 16, y + 4), colours[name], -1)
        cv2.putText(img, name, (x + 22, y + 2), font, 0.5, (0, 0, 0), 1)
        x += 120
    cv2.putText(img, "grey: in-process baseline (read + gray + Canny)", (20, y + 35), font, 0.5, (90, 90, 90), 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img)


def print_report(report: dict) -> None:
    for size in report["sizes"]:
        w, h = size["size"]
        print(f"\n{w}x{h} ({w * h / 1e6:.1f} MP), 2 workers x 1 process, {report['repeats']} repeats, medians")
        print(f"{'candidate':24s} {'median s':>9s} {'min s':>7s} {'max s':>7s} {'ratio':>7s} {'target':>7s}  vs")
        for r in size["rows"]:
            target = f"{r['target']:.2f}x" if r["target"] else ""
            ratio = "" if r["vs"] == r["candidate"] else f"{r['ratio']:.2f}x"
            print(f"{r['candidate']:24s} {r['median_s']:9.3f} {r['min_s']:7.3f} {r['max_s']:7.3f} {ratio:>7s} "
                  f"{target:>7s}  {r['vs'] if ratio else ''}")
        for codec, stages in size["stages"].items():
            print(f"  stages, api {codec} (ms): " + ", ".join(f"{k} {v * 1e3:.0f}" for k, v in stages.items()))
    lat = report["latency_640x480"]
    print("\n640x480 submit-to-result latency, warm workers (target <= 20 ms): "
          + ", ".join(f"{c} median {v['median_ms']:.1f} ms (min {v['min_ms']:.1f}, n={v['samples']})" for c, v in lat.items()))
    rss = report["submitter_rss"]
    print(f"submitter peak RSS at {report['sizes'][-1]['size'][0]}x{report['sizes'][-1]['size'][1]}: "
          f"jpeg {rss['peak_mb_jpeg']:.0f} MB, lossless {rss['peak_mb_lossless']:.0f} MB "
          f"(the whole image, BGR: {rss['image_bgr_mb']:.0f} MB)")
    wr = report["worker_rss"]
    last = wr[f"rss_mb_after_{wr['jobs']}"]
    print(f"worker RSS after 20 -> {wr['jobs']} jobs of 1920x1080: "
          + ", ".join(f"{k} {wr['rss_mb_after_20'][k]:.0f} -> {last[k]:.0f} MB "
                      f"({wr['growth'][k]:+.1%})" for k in wr["growth"])
          + " (target: growth <= 10 %)")
    print(f"`cli.py --help` wall time: median {report['help_wall']['median_s'] * 1e3:.0f} ms (target <= 200 ms)")
    st = report["strip_step"]
    m = st["medians_ms_per_mp"]
    print(f"exact Canny strip step vs cv2.Canny, one thread, {st['strips']} strips of {st['rows']} rows: "
          f"{m['canny_strip']:.2f} vs {m['cv2.Canny']:.2f} ms/MP = {st['ratio']:.2f}x (target <= 1.5x); steps: "
          + ", ".join(f"{k} {m[k]:.2f}" for k in ("gradients", "canny pass", "seam bands")))
    marks = report["timeline"]["marks"]
    print("time line of one job (s since submit): " + ", ".join(f"{k} {v:.3f}" for k, v in marks.items() if v is not None))
    b = report["batch"]
    print(f"canny batch of {b['images']} 1920x1080 PNGs: " + "; ".join(f"{k} {v:.2f} s" for k, v in b["median_s"].items())
          + f"; throughput vs the loop {b['ratio']:.2f}x (target >= 1.0x)")
    sb = report["small_behind_big"]
    print(f"640x480 submitted once a {sb['big'][0]}x{sb['big'][1]} job ({sb['big_median_s']:.1f} s) is 10 % done: "
          + ", ".join(f"{k} {v:.0f} ms" for k, v in sb["median_ms"].items())
          + f" (idle {sb['idle_median_ms']:.0f} ms; target <= 1000 ms)")
    for d in report["dask"]:
        print(f"{d['op']} {d['mode']} {d['size'][0]}x{d['size'][1]}: luminagrid {d['median_s']['luminagrid']:.2f} s vs "
              f"dask map_overlap {d['median_s']['dask map_overlap']:.2f} s = {d['ratio']:.2f}x (target <= 0.9x); "
              f"exact {d['exact']}")
    if not report["dask"]:
        print("Dask rows skipped: install the bench extra (pip install -e '.[bench]')")
    print(f"\nJSON: {report['json']}\nchart: {report['chart']}\ntime line: {report['timeline_chart']}")


def print_gigapixel(g: dict) -> None:
    growth = max(v for d in g["worker_pool_peak_growth_mb"].values() for v in d.values())
    print(f"{g['size'][0]}x{g['size'][1]} gray PNG, {g['strips']} strips: {g['job_s']:.1f} s, exact {g['exact']}, "
          f"submitter peak RSS {g['submitter_peak_mb']:.0f} MB (target <= 600), worker pool peak growth "
          f"{growth:.0f} MB vs {g['strip_needs_mb']:.0f} MB one strip needs = {g['worst_worker_vs_strip_needs']:.2f}x "
          f"(target <= 2x); while strips run: {g['worst_worker_while_strips_run_vs_strip_needs']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", action="append", help="WIDTHxHEIGHT (repeatable; default 7680x4320)")
    parser.add_argument("--codec", action="append", choices=["lossless", "jpeg"], help="default: both")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="3 repeats, 15 latency samples")
    parser.add_argument("--worker-jobs", type=int, default=200, help="jobs for the worker RSS figure")
    parser.add_argument("--no-gigapixel", action="store_true", help="skip the 40000x25000 run (minutes, ~2 GB of disk)")
    parser.add_argument("--only-gigapixel", action="store_true", help="just the 40000x25000 run")
    parser.add_argument("--stamp", help=argparse.SUPPRESS)  # the JSON's name, for --only-gigapixel
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="folder for JSON and chart")
    args = parser.parse_args()
    repeats = 3 if args.quick else args.repeats
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in (args.size or ["7680x4320"])]
    codecs = args.codec or ["lossless", "jpeg"]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report: dict = {"repeats": repeats, "workers": 2, "when": stamp,
                    "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "opencv": cv2.__version__}}
    if args.only_gigapixel:
        args.out.mkdir(parents=True, exist_ok=True)
        report["json"] = str(args.out / f"{args.stamp or 'gigapixel-' + stamp}.json")
        gigapixel(report)
        return
    with tempfile.TemporaryDirectory(prefix="lg-bench-") as tmp, LocalCluster(workers=2, concurrency=1) as cluster:
        work = Path(tmp)
        ports = [free_port(), free_port()]
        protos = [spawn([sys.executable, str(REPO / "bench" / "prototype.py"), "worker", str(p)], None) for p in ports]
        try:
            for proc, port in zip(protos, ports):
                wait_until_ready(proc, lambda port=port: listening(port), f"prototype worker on port {port}", None)
            report["sizes"] = [measure_size(cluster, work, w, h, codecs, repeats, ports) for w, h in sizes]
        finally:
            for proc in protos:
                proc.kill()
                proc.wait()
        report["latency_640x480"] = latency(15 if args.quick else 40)
        report["submitter_rss"] = submitter_rss(cluster, work, *sizes[-1])
        report["worker_rss"] = worker_rss(cluster, args.worker_jobs)
        report["help_wall"] = figures.help_wall(7)
        report["strip_step"] = canny_strip.measure(*sizes[-1], repeats=repeats)
        w, h = sizes[-1]
        report["timeline"] = figures.timeline(work / f"input-{w}x{h}.png", work / "timeline.png", codecs[0])
        import ops as ops_bench  # noqa: PLC0415 - it imports this module

        report["batch"] = ops_bench.measure_batch(cluster, work, "canny", 20 if args.quick else 50, 1920, 1080, repeats)
        report["small_behind_big"] = figures.small_behind_big((20000, 12500), 2 if args.quick else 3)
        dask = [figures.versus_dask(op, mode, 3840, 2160, repeats, interleaved)
                for op, mode in (("bilateral", "color"), ("denoise", "gray"))]
        report["dask"] = [d for d in dask if d is not None]
    report["json"] = str(args.out / f"run-{stamp}.json")
    report["chart"] = str(args.out / f"stages-{stamp}.png")
    report["timeline_chart"] = str(args.out / f"timeline-{stamp}.png")
    chart(report["sizes"], Path(report["chart"]))
    w, h = report["sizes"][-1]["size"]
    figures.timeline_chart(report["timeline"], Path(report["timeline_chart"]),
                           f"one {w}x{h} PNG job, {report['timeline']['codec']}, 2 workers: streamed in, streamed out")
    Path(report["json"]).write_text(json.dumps(report, indent=2))
    print_report(report)
    if not (args.quick or args.no_gigapixel):
        # In a fresh process: after Dask and a thousand jobs here, libvips writing the gigapixel PNG
        # crashed this one once (SIGSEGV); the figure is the same either way.
        stem = args.out / f"gigapixel-{stamp}"
        env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}  # luminagrid set it here
        subprocess.run([sys.executable, __file__, "--only-gigapixel", "--out", str(args.out), "--stamp", stem.name],
                       check=True, env=env)
        report["gigapixel"] = json.loads(Path(f"{stem}.json").read_text())["gigapixel"]
        Path(report["json"]).write_text(json.dumps(report, indent=2))


def gigapixel(report: dict) -> None:
    """The 40000x25000 run, on 2 fresh workers whose pixel limit is raised too; added to the JSON."""
    with tempfile.TemporaryDirectory(prefix="lg-bench-giga-") as tmp, \
            LocalCluster(workers=2, concurrency=1, worker_env={"LUMINAGRID_MAX_PIXELS": str(40000 * 25000)}) as giga:
        report["gigapixel"] = figures.gigapixel(giga, Path(tmp), 40000, 25000)
    Path(report["json"]).write_text(json.dumps(report, indent=2))
    print_gigapixel(report["gigapixel"])


if __name__ == "__main__":
    main()
