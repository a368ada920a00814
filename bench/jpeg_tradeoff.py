"""What JPEG transport costs in accuracy and saves in bytes, against lossless.

    python bench/jpeg_tradeoff.py

For the shipped example photo and the bench's 7680x4320 photo-like image: the share of Canny's edge
pixels that change when Canny runs on the JPEG round trip instead of the original gray image
(distribution itself adds no error: both are computed whole-image here), and bytes per megapixel.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from photos import photo_like  # noqa: E402

from luminagrid import codec  # noqa: E402
from luminagrid.codec import Codec  # noqa: E402


def main() -> None:
    inputs = {
        "examples/coffee.png 600x400": cv2.cvtColor(cv2.imread(str(REPO / "examples/coffee.png")), cv2.COLOR_BGR2GRAY),
        "photo-like 7680x4320": cv2.cvtColor(photo_like(7680, 4320), cv2.COLOR_BGR2GRAY),
    }
    print(f"{'image':30s} {'codec':10s} {'KB/MP':>7s} {'edge px changed':>16s} {'of all px':>10s}")
    for name, gray in inputs.items():
        mp = gray.size / 1e6
        ref = cv2.Canny(gray, 100, 200) > 0
        size = len(codec.encode_strip(gray, Codec.lossless, 0))
        print(f"{name:30s} {'lossless':10s} {size / 1e3 / mp:7.0f} {'0 %':>16s} {'0 %':>10s}")
        for quality in (90, 95, 100):
            size = len(codec.encode_strip(gray, Codec.jpeg, quality))
            got = cv2.Canny(codec.jpeg_roundtrip(gray, quality), 100, 200) > 0
            changed = np.count_nonzero(got != ref)
            print(f"{name:30s} {'jpeg q' + str(quality):10s} {size / 1e3 / mp:7.0f} "
                  f"{100 * changed / max(1, ref.sum()):15.1f}% {100 * changed / ref.size:9.2f}%")


if __name__ == "__main__":
    main()
