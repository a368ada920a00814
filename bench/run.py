"""End-to-end benchmark: luminagrid vs a single-process OpenCV script, ratios from one run.

    python bench/run.py            # 7680x4320, 5 repeats
    python bench/run.py --quick    # 3 repeats

Starts its own Redis and 2 local workers (one pool process each), builds a photo-like input from
examples/coffee.png (mirror-tiled at 2x, so it has real edges and texture, not noise), then times,
interleaved so that machine drift hits every candidate alike:
- baseline:        in-process read + gray + cv2.Canny + PNG write (OpenCV's default threading)
- lossless / jpeg: in-process read + gray + luminagrid.submit + wait + PNG write
- cli-* / script:  the same as whole `python ...` processes (imports and start-up included)
Prints medians and ratios to the baseline, writes JSON next to this file under results/.
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
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import luminagrid  # noqa: E402
from luminagrid import images, jobs  # noqa: E402
from luminagrid.local import LocalCluster  # noqa: E402
from luminagrid.settings import Settings  # noqa: E402

BASELINE_SCRIPT = """
import sys, cv2
img = cv2.imread(sys.argv[1], cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
cv2.imwrite(sys.argv[2], cv2.Canny(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), 100, 200))
"""


def photo_like(width: int, height: int) -> np.ndarray:
    """examples/coffee.png at 2x, mirror-tiled to (height, width, 3)."""
    tile = cv2.imread(str(REPO / "examples" / "coffee.png"))
    tile = cv2.resize(tile, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    quad = np.vstack([np.hstack([tile, tile[:, ::-1]]), np.hstack([tile[::-1], tile[::-1, ::-1]])])
    reps = (-(-height // quad.shape[0]), -(-width // quad.shape[1]), 1)
    return np.ascontiguousarray(np.tile(quad, reps)[:height, :width])


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="7680x4320", help="WIDTHxHEIGHT of the input image")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="3 repeats")
    parser.add_argument("--no-process", action="store_true", help="skip the whole-process candidates")
    parser.add_argument("--json", type=Path, default=None, help="where to write the JSON (default: bench/results/)")
    args = parser.parse_args()
    repeats = 3 if args.quick else args.repeats
    width, height = (int(v) for v in args.size.lower().split("x"))

    with tempfile.TemporaryDirectory(prefix="lg-bench-") as tmp:
        samples = measure(Path(tmp), width, height, repeats, not args.no_process)
    report(samples, width, height, repeats, args.json)


def measure(work: Path, width: int, height: int, repeats: int, processes: bool) -> dict[str, list[float]]:
    """Time every candidate `repeats` times, interleaved; returns name -> seconds."""
    src = work / "input.png"
    cv2.imwrite(str(src), photo_like(width, height))
    out = work / "out.png"
    settings = Settings.from_env()

    def baseline() -> None:
        img = cv2.imread(str(src), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
        cv2.imwrite(str(out), cv2.Canny(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), 100, 200))

    def distributed(codec: str) -> Callable[[], None]:
        def run() -> None:
            gray = jobs.load_gray(src, settings)
            job = jobs.submit_gray(gray, jobs.Params(codec=luminagrid.codec.Codec(codec)))
            images.write_image_atomic(out, job.wait(300).edges)
        return run

    with LocalCluster(workers=2, concurrency=1) as cluster:
        env = {**os.environ, "LUMINAGRID_BROKER_URL": cluster.url}

        def process(argv: list[str]) -> Callable[[], None]:
            return lambda: subprocess.run(argv, env=env, check=True, capture_output=True)

        candidates: dict[str, Callable[[], None]] = {
            "baseline (in-process)": baseline,
            "luminagrid lossless": distributed("lossless"),
            "luminagrid jpeg q95": distributed("jpeg"),
        }
        if processes:
            candidates |= {
                "script (process)": process([sys.executable, "-c", BASELINE_SCRIPT, str(src), str(out)]),
                "cli lossless (process)": process(
                    [sys.executable, str(REPO / "cli.py"), "submit", str(src), "-o", str(out), "--codec", "lossless"]),
                "cli jpeg (process)": process(
                    [sys.executable, str(REPO / "cli.py"), "submit", str(src), "-o", str(out)]),
            }
        for fn in candidates.values():  # warm-up: imports, worker caches, page cache
            fn()
        samples: dict[str, list[float]] = {name: [] for name in candidates}
        names = list(candidates)
        for r in range(repeats):
            for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order
                samples[name].append(timed(candidates[name]))
    return samples


def report(samples: dict[str, list[float]], width: int, height: int, repeats: int, json_path: Path | None) -> None:
    """Print medians and ratios; write them, with every sample, as JSON."""

    def ratio_base(name: str) -> str:
        return "script (process)" if "(process)" in name else "baseline (in-process)"

    medians = {name: statistics.median(v) for name, v in samples.items()}
    rows = [
        {
            "candidate": name,
            "median_s": round(medians[name], 4),
            "min_s": round(min(samples[name]), 4),
            "max_s": round(max(samples[name]), 4),
            "vs": ratio_base(name),
            "ratio": round(medians[name] / medians[ratio_base(name)], 3),
        }
        for name in samples
    ]
    print(f"\n{width}x{height} ({width * height / 1e6:.1f} MP), 2 workers x 1 process, {repeats} repeats, medians")
    print(f"{'candidate':26s} {'median s':>9s} {'min s':>8s} {'max s':>8s}  {'ratio':>6s}  vs")
    for row in rows:
        print(f"{row['candidate']:26s} {row['median_s']:9.3f} {row['min_s']:8.3f} {row['max_s']:8.3f}  "
              f"{row['ratio']:6.2f}x  {row['vs']}")
    report = {
        "size": [width, height], "repeats": repeats, "workers": 2, "rows": rows, "samples": samples,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "opencv": cv2.__version__},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = json_path or REPO / "bench" / "results" / f"run-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"JSON: {path}")


if __name__ == "__main__":
    main()
