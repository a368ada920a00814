"""The README's top picture, docs/examples.png: examples/coffee.png, its Canny edges, its denoised version.

    .venv/bin/python bench/readme_picture.py [--out docs/examples.png] [--width 1200]

Both results come from real luminagrid jobs (`luminagrid.submit`, 4 strips, lossless) on a private
Redis with 2 local workers, and are checked against the one-machine OpenCV calls before they are
drawn: the picture shows exactly what `cli.py submit` writes. The three panels are downscaled side
by side (INTER_AREA), each under a small label.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

import luminagrid
from luminagrid.local import LocalCluster

REPO = Path(__file__).resolve().parent.parent

PHOTO = REPO / "examples" / "coffee.png"
LABEL_H = 34
GAP = 8
FONT = cv2.FONT_HERSHEY_SIMPLEX


def run_jobs() -> tuple[np.ndarray, np.ndarray]:
    """Canny edges and the denoised photo, each a real 4-strip job on 2 workers."""
    with LocalCluster(workers=2, concurrency=1):
        edges = luminagrid.submit(PHOTO, op="canny", strips=4, codec="lossless").wait(timeout_s=120)
        denoised = luminagrid.submit(PHOTO, op="denoise", strips=4, codec="lossless").wait(timeout_s=300)
    print(f"canny: served by {edges.workers}; denoise: served by {denoised.workers}")
    return edges.image, denoised.image


def check_exact(photo: np.ndarray, edges: np.ndarray, denoised: np.ndarray) -> None:
    """The jobs' outputs equal the operations on the whole image (README, Operations)."""
    gray = cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY)
    if not np.array_equal(edges, cv2.Canny(gray, 100, 200)):
        raise SystemExit("canny job differs from cv2.Canny(gray, 100, 200)")
    if not np.array_equal(denoised, cv2.fastNlMeansDenoisingColored(photo, None, 10, 10, 7, 21)):
        raise SystemExit("denoise job differs from cv2.fastNlMeansDenoisingColored(img, None, 10, 10, 7, 21)")
    print("both outputs equal the one-machine OpenCV calls")


def panel(image: np.ndarray, width: int, label: str) -> np.ndarray:
    """`image` scaled to `width` (BGR), under a white band with `label`."""
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    height = round(image.shape[0] * width / image.shape[1])
    scaled = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    band = np.full((LABEL_H, width, 3), 255, np.uint8)
    cv2.putText(band, label, (4, LABEL_H - 11), FONT, 0.55, (40, 40, 40), 1, cv2.LINE_AA)
    return np.vstack([band, scaled])


def compose(photo: np.ndarray, edges: np.ndarray, denoised: np.ndarray, width: int) -> np.ndarray:
    each = (width - 2 * GAP) // 3
    panels = [
        panel(photo, each, "examples/coffee.png"),
        panel(edges, each, "submit --op canny (the default)"),
        panel(denoised, each, "submit --op denoise"),
    ]
    left = (width - 3 * each) // 2  # the gaps take what the panels leave: exactly `width` wide
    gaps = [np.full((panels[0].shape[0], w, 3), 255, np.uint8) for w in (left, width - 3 * each - left)]
    return np.hstack([panels[0], gaps[0], panels[1], gaps[1], panels[2]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "examples.png")
    parser.add_argument("--width", type=int, default=1200)
    args = parser.parse_args()
    photo = cv2.imread(str(PHOTO), cv2.IMREAD_COLOR)
    edges, denoised = run_jobs()
    check_exact(photo, edges, denoised)
    picture = compose(photo, edges, denoised, args.width)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(args.out), picture, [cv2.IMWRITE_PNG_COMPRESSION, 9]):
        raise SystemExit(f"could not write {args.out}")
    print(f"wrote {args.out}: {picture.shape[1]}x{picture.shape[0]}, {args.out.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
