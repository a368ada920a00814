"""The worker's exact Canny strip step against `cv2.Canny` on the same strip, one thread.

    python bench/canny_strip.py                   # 7680x4320 photo-like, the default strip plan
    python bench/canny_strip.py --rows 128        # 1 MP strips (the plan before 4 MP strips)
    python bench/canny_strip.py --size 3840x2160 --repeats 9

Times, interleaved over every strip of the plan (halos included, as a worker gets them):
`cv2.Canny(strip, 100, 200)` and `luminagrid.canny.canny_strip`, and the steps of the latter
(the walled Sobel gradients, the one Canny pass on them, and the bands beside the seams where
pending components are labelled). Prints ms per megapixel of own rows (medians) and the ratio;
writes JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from photos import photo_like  # noqa: E402

from luminagrid import canny, ops, strips  # noqa: E402

LOW, HIGH = 100.0, 200.0


def steps(
    gray: np.ndarray, halo_top: int, halo_bottom: int, seam_above: bool, seam_below: bool,
) -> dict[str, float]:
    """`canny.canny_strip`'s work, step by step (seconds), for the breakdown: the walled
    gradients, the one Canny pass on them, then the bands beside the seams."""
    t0 = time.perf_counter()
    dx, dy = canny._walled(gray, halo_top, halo_bottom, seam_above, seam_below)
    t1 = time.perf_counter()
    top = 2 if seam_above else 0
    edges = cv2.Canny(dx, dy, LOW, HIGH)[top:top + gray.shape[0] - halo_top - halo_bottom]
    np.bitwise_and(edges, 1, out=edges)
    t2 = time.perf_counter()
    canny.seam_bands(dx, dy, edges, top, LOW, seam_above, seam_below)
    t3 = time.perf_counter()
    return {"gradients": t1 - t0, "canny pass": t2 - t1, "seam bands": t3 - t2}


def measure(width: int, height: int, rows: int = 0, repeats: int = 5) -> dict:
    """Median ms per MP of own rows, per candidate and step, over every strip of the plan."""
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        gray = cv2.cvtColor(photo_like(width, height), cv2.COLOR_BGR2GRAY)
        per_strip = ops.get("canny").strip_pixels
        count = -(-height // rows) if rows else strips.default_strip_count(height, width, per_strip)
        plan = strips.plan_strips(height, count, strips.halo_for(canny.HALO_NEEDED_ROWS))
        samples: dict[str, list[float]] = {}
        for _ in range(repeats):
            for s in plan:
                piece = gray[s.top:s.bottom]
                mp = (s.row1 - s.row0) * width / 1e6
                seam_above, seam_below = s.row0 > 0, s.row1 < height
                t0 = time.perf_counter()
                cv2.Canny(piece, LOW, HIGH)
                t1 = time.perf_counter()
                canny.canny_strip(piece, s.halo_top, s.halo_bottom, LOW, HIGH, seam_above, seam_below)
                t2 = time.perf_counter()
                for name, seconds in {"cv2.Canny": t1 - t0, "canny_strip": t2 - t1,
                                      **steps(piece, s.halo_top, s.halo_bottom, seam_above,
                                              seam_below)}.items():
                    samples.setdefault(name, []).append(seconds * 1000 / mp)
    finally:
        cv2.setNumThreads(threads)
    medians = {name: statistics.median(v) for name, v in samples.items()}
    own_rows = plan[1].row1 - plan[1].row0 if len(plan) > 1 else height
    return {"size": [width, height], "strips": len(plan), "rows": own_rows, "halo": plan[0].halo_bottom,
            "repeats": repeats, "medians_ms_per_mp": medians, "ratio": medians["canny_strip"] / medians["cv2.Canny"],
            "samples": samples}


def print_report(r: dict) -> None:
    w, h = r["size"]
    print(f"{w}x{h}, {r['strips']} strips of {r['rows']} rows (+{r['halo']}-row halos), one thread, "
          f"{r['repeats']} repeats, medians in ms per MP of own rows")
    for name in ("cv2.Canny", "canny_strip", "gradients", "canny pass", "seam bands"):
        print(f"  {name:<12} {r['medians_ms_per_mp'][name]:6.2f}")
    print(f"  canny_strip / cv2.Canny = {r['ratio']:.2f}x (target <= 1.5x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="7680x4320")
    parser.add_argument("--rows", type=int, default=0, help="own rows per strip (default: the job's default plan)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    report = measure(width, height, args.rows, args.repeats)
    print_report(report)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"canny-strip-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"JSON: {path}")


if __name__ == "__main__":
    main()
