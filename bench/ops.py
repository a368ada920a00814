"""Heavy operations and batches: where distribution pays. Ratios from one run, medians.

    python bench/ops.py            # denoise + bilateral at 3840x2160 (colour and gray), batch of 50
    python bench/ops.py --quick    # 2 repeats, colour only, batch of 20
    python bench/ops.py --op bilateral --size 1920x1080 --repeats 5 --batch 0
    python bench/ops.py --only-batch --batch-op bilateral   # just the batch of 50

Starts its own Redis and 2 local workers (one pool process each, OpenCV pinned to one thread as
always in workers), builds photo-like inputs from examples/coffee.png (with sensor-like noise for
`denoise`), then measures, interleaving candidates so machine drift hits all alike:

1. per operation: the in-process OpenCV call with OpenCV's default threading (all cores), and
   with one thread (what OpenCV's own threading gains bounds what 2 workers can gain over it), vs
   `luminagrid.submit(array, op=...).wait()` (lossless, so the output is bit-identical) with 2
   workers and with 1 worker (the other's consumer is cancelled over Celery's remote control);
2. a batch of N 1920x1080 PNG files: a single-process loop (read, operation, write PNG; default
   threading) vs `python cli.py submit FOLDER --op ... --out-dir ...` against the warm workers.

Prints tables and writes JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from photos import noisy, photo_like  # noqa: E402
from run import interleaved  # noqa: E402

import luminagrid  # noqa: E402
from luminagrid import ops  # noqa: E402
from luminagrid.app import app  # noqa: E402
from luminagrid.local import LocalCluster  # noqa: E402
from luminagrid.settings import QUEUE  # noqa: E402

TARGETS = {"2 workers vs 1 worker": 1.85, "2 workers vs in-process": 1.30}
LOOP = """
import sys, cv2
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from luminagrid import ops
op = ops.get(sys.argv[2]); values = op.values({})
for src in sorted(Path(sys.argv[3]).glob("*.png")):
    img = op.prepare(cv2.imread(str(src), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR))
    cv2.imwrite(str(Path(sys.argv[4]) / f"{src.stem}.{op.suffix}.png"), op.apply(img, values))
"""


def input_for(op: str, width: int, height: int, mode: str) -> np.ndarray:
    image = photo_like(width, height)
    image = noisy(image) if op == "denoise" else image
    return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if mode == "gray" else image


def consuming(worker: str, on: bool) -> None:
    """Start or stop `worker` taking strips from the queue (Celery remote control), and wait for it."""
    if on:
        app.control.add_consumer(QUEUE, destination=[worker], reply=True, timeout=5)
    else:
        app.control.cancel_consumer(QUEUE, destination=[worker], reply=True, timeout=5)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        queues = (app.control.inspect(destination=[worker], timeout=2).active_queues() or {}).get(worker, [])
        if any(q["name"] == QUEUE for q in queues) == on:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{worker} did not {'start' if on else 'stop'} consuming {QUEUE}")


def measure_op(cluster: LocalCluster, name: str, width: int, height: int, mode: str, repeats: int) -> dict:
    op = ops.get(name)
    image = input_for(name, width, height, mode)
    values = op.values({})
    whole = op.apply(image, values)
    second = cluster.nodes[1].name
    strips_used: list[int] = []
    outputs: list[np.ndarray] = []

    def distributed() -> None:
        job = luminagrid.submit(image, op=name, codec="lossless")
        outputs.append(job.wait(900).image)
        strips_used.append(job.strip_count)

    threads = cv2.getNumThreads()
    candidates = {
        "in-process (OpenCV threads)": lambda: op.apply(image, values),
        # OpenCV's own threading gain bounds what 2 single-threaded workers can gain over it.
        "in-process (1 thread)": lambda: op.apply(image, values),
        "1 worker": distributed,
        "2 workers": distributed,
    }
    setups = {  # untimed, before each call: OpenCV's threads, and the second worker's consumer
        "in-process (OpenCV threads)": lambda: cv2.setNumThreads(threads),
        "in-process (1 thread)": lambda: cv2.setNumThreads(1),
        "1 worker": lambda: consuming(second, False),
        "2 workers": lambda: consuming(second, True),
    }
    try:
        samples = interleaved(candidates, repeats, setups)
    finally:
        cv2.setNumThreads(threads)
    consuming(second, True)
    assert all(np.array_equal(out, whole) for out in outputs), "a distributed output differs from the in-process call"
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "op": name, "mode": mode, "size": [width, height], "strips": strips_used[-1],
        "opencv_threads": cv2.getNumThreads(), "samples_s": samples, "median_s": med,
        "ratios": {
            "2 workers vs 1 worker": med["1 worker"] / med["2 workers"],
            "2 workers vs in-process": med["in-process (OpenCV threads)"] / med["2 workers"],
            "1 worker vs in-process": med["in-process (OpenCV threads)"] / med["1 worker"],
            "OpenCV threads vs 1 thread": med["in-process (1 thread)"] / med["in-process (OpenCV threads)"],
        },
    }


def measure_batch(cluster: LocalCluster, work: Path, name: str, count: int, width: int, height: int, repeats: int) -> dict:
    src = work / f"batch-{name}"
    src.mkdir()
    base = photo_like(width, height)
    for i in range(count):  # different images: shifted crops of a larger photo-like canvas
        img = np.roll(base, (37 * i, 53 * i), axis=(0, 1))
        cv2.imwrite(str(src / f"img{i:03d}.png"), noisy(img) if name == "denoise" else img)
    env = {**os.environ, "LUMINAGRID_BROKER_URL": cluster.url}

    def out_dir(tag: str) -> Path:
        path = work / f"out-{name}-{tag}"
        path.mkdir(exist_ok=True)
        return path

    loop = [sys.executable, "-c", LOOP, str(REPO), name, str(src), str(out_dir("loop"))]
    cli = [sys.executable, str(REPO / "cli.py"), "submit", str(src), "--op", name, "--codec", "lossless",
           "--out-dir", str(out_dir("cli"))]
    samples = interleaved(
        {"single-process loop": lambda: subprocess.run(loop, check=True, capture_output=True),
         "cli submit FOLDER (2 workers)": lambda: subprocess.run(cli, env=env, check=True, capture_output=True)},
        repeats,
    )
    for i in range(count):  # the batch's outputs equal the loop's
        a = cv2.imread(str(out_dir("loop") / f"img{i:03d}.{ops.get(name).suffix}.png"), cv2.IMREAD_UNCHANGED)
        b = cv2.imread(str(out_dir("cli") / f"img{i:03d}.{ops.get(name).suffix}.png"), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(a, b), f"batch output {i} differs from the loop's"
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "op": name, "images": count, "size": [width, height], "samples_s": samples, "median_s": med,
        "images_per_s": {k: count / v for k, v in med.items()},
        "ratio": med["single-process loop"] / med["cli submit FOLDER (2 workers)"],
    }


def print_report(report: dict) -> None:
    print(f"\nheavy operations, lossless, {report['repeats']} repeats, medians; "
          f"in-process uses OpenCV's default threading ({report['opencv_threads']} threads)")
    print(f"{'op':10s} {'mode':5s} {'size':>10s} {'strips':>6s} {'in-proc s':>9s} {'1 thread s':>10s} {'1 wkr s':>8s} "
          f"{'2 wkr s':>8s} {'2w/1w':>6s} {'2w/in-proc':>10s} {'threads gain':>12s}")
    for r in report["ops"]:
        m, q = r["median_s"], r["ratios"]
        print(f"{r['op']:10s} {r['mode']:5s} {'x'.join(map(str, r['size'])):>10s} {r['strips']:6d} "
              f"{m['in-process (OpenCV threads)']:9.2f} {m['in-process (1 thread)']:10.2f} {m['1 worker']:8.2f} "
              f"{m['2 workers']:8.2f} {q['2 workers vs 1 worker']:5.2f}x {q['2 workers vs in-process']:9.2f}x "
              f"{q['OpenCV threads vs 1 thread']:11.2f}x")
    print(f"targets: 2 workers >= {TARGETS['2 workers vs 1 worker']}x of 1 worker; "
          f">= {TARGETS['2 workers vs in-process']}x faster than in-process")
    for b in report["batches"]:
        m, ips = b["median_s"], b["images_per_s"]
        print(f"\nbatch of {b['images']} {b['size'][0]}x{b['size'][1]} PNGs, --op {b['op']}: "
              + "; ".join(f"{k} {m[k]:.1f} s ({ips[k]:.2f} images/s)" for k in m)
              + f"; throughput ratio {b['ratio']:.2f}x")
    print(f"\nJSON: {report['json']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", action="append", choices=["denoise", "bilateral", "gaussian", "canny"],
                        help="default: denoise and bilateral")
    parser.add_argument("--size", default="3840x2160", help="WIDTHxHEIGHT of the single-image runs")
    parser.add_argument("--mode", action="append", choices=["color", "gray"], help="default: color and gray")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=50, help="images in the batch run (0: skip)")
    parser.add_argument("--batch-op", action="append", help="default: bilateral and canny")
    parser.add_argument("--quick", action="store_true", help="2 repeats, colour only, batch of 20")
    parser.add_argument("--only-batch", action="store_true", help="skip the single-image runs")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    repeats = 2 if args.quick else args.repeats
    modes = args.mode or (["color"] if args.quick else ["color", "gray"])
    batch = 20 if args.quick and args.batch == 50 else args.batch
    width, height = (int(v) for v in args.size.lower().split("x"))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report: dict = {"repeats": repeats, "workers": 2, "when": stamp, "opencv_threads": cv2.getNumThreads(),
                    "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "opencv": cv2.__version__}}
    with tempfile.TemporaryDirectory(prefix="lg-bench-") as tmp, LocalCluster(workers=2, concurrency=1) as cluster:
        report["ops"] = [measure_op(cluster, name, width, height, mode, repeats)
                         for name in (args.op or ["denoise", "bilateral"]) for mode in modes if not args.only_batch]
        report["batches"] = [measure_batch(cluster, Path(tmp), name, batch, 1920, 1080, repeats)
                             for name in (args.batch_op or ["bilateral", "canny"]) if batch]
    args.out.mkdir(parents=True, exist_ok=True)
    report["json"] = str(args.out / f"ops-{stamp}.json")
    Path(report["json"]).write_text(json.dumps(report, indent=2))
    print_report(report)


if __name__ == "__main__":
    main()
