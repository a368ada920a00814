"""Exact strip-parallel Canny: the pure numpy/OpenCV core (no Celery in here).

Whole-image Canny = non-maximum suppression + thresholds + hysteresis. The first two are local
(a pixel depends on rows within 2 of it: Sobel 3x3, then NMS), so a strip with a 2-row halo gets
them exactly. Hysteresis is not local: a weak pixel is an edge when an 8-connected chain of weak
pixels links it to a strong one, however far away. So:

1. On each strip (worker): `candidates` = NMS maxima above `low` (`cv2.Canny(s, low, low)`),
   `strong` = above `high` (`cv2.Canny(s, high, high)`). Resolve hysteresis inside the strip:
   candidate components holding a strong pixel are edges. Components without one that touch a
   seam row are *pending*: a neighbouring strip may link them to an edge.
2. On the stitcher: a pending component that touches an edge pixel across a seam (directly, or
   through other pending pixels) becomes an edge. Everything else pending is dropped.

The result is pixel-identical to `cv2.Canny(gray, low, high)` (L1 gradient, aperture 3), with
thresholds rounded down to whole numbers as OpenCV itself applies them (`whole_thresholds`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import cv2
import numpy as np

#: Rows beyond its own that a strip needs: 1 for the 3x3 Sobel, 1 for non-maximum suppression.
HALO_NEEDED_ROWS = 2
#: Largest meaningful threshold: the L1 norm of two 3x3 Sobel responses on 8-bit input.
MAX_THRESHOLD = 2040.0


class StripEdges(NamedTuple):
    """A strip's hysteresis, resolved as far as the strip alone allows. Both (rows, width) bool."""

    edges: np.ndarray
    pending: np.ndarray


def whole_thresholds(low: float, high: float) -> tuple[float, float]:
    """Thresholds as OpenCV applies them: gradients are integers, so `m > t` is `m > floor(t)`.

    Flooring up front also makes OpenCV agree with itself: its single-threaded path rounds a
    threshold to float32 first, so 9.99999999999997 acts as 10 there and as 9 with threads.
    """
    return float(math.floor(low)), float(math.floor(high))


def canny_strip(
    gray: np.ndarray, halo_top: int, halo_bottom: int, low: float, high: float,
    seam_above: bool, seam_below: bool,
) -> StripEdges:
    """Edges of the rows `halo_top : rows - halo_bottom` of a (rows, width) uint8 strip.

    `seam_above`/`seam_below` say whether another strip continues the image there; only
    components touching such a seam can be pending.
    """
    low, high = whole_thresholds(low, high)
    end = gray.shape[0] - halo_bottom
    candidates = cv2.Canny(gray, low, low)[halo_top:end]
    strong = cv2.Canny(gray, high, high)[halo_top:end]
    count, labels = cv2.connectedComponents(candidates, connectivity=8, ltype=cv2.CV_32S)
    is_edge = np.zeros(count, bool)
    is_edge[labels[strong > 0]] = True
    is_edge[0] = False  # label 0 is the background
    edges = is_edge[labels]

    at_seam = np.zeros(count, bool)
    if seam_above:
        at_seam[labels[0]] = True
    if seam_below:
        at_seam[labels[-1]] = True
    at_seam[0] = False
    is_pending = at_seam & ~is_edge
    pending = is_pending[labels] if is_pending.any() else np.zeros_like(edges)
    return StripEdges(edges, pending)


def _touching(row: np.ndarray) -> np.ndarray:
    """Pixels of a row 8-adjacent (across a seam) to a set pixel of `row`: its 1-pixel dilation."""
    near = row.copy()
    near[1:] |= row[:-1]
    near[:-1] |= row[1:]
    return near


def finish_seams(edges: np.ndarray, pending: np.ndarray, seams: list[int]) -> np.ndarray:
    """Resolve hysteresis across seams in place and return `edges` (both (H, W) bool).

    `seams` are the first rows of every strip but the first.
    """
    if not seams or not pending.any():
        return edges
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        pending.view(np.uint8), connectivity=8, ltype=cv2.CV_32S
    )
    linked = np.zeros(count, bool)
    for y in seams:
        linked[labels[y - 1][_touching(edges[y])]] = True
        linked[labels[y][_touching(edges[y - 1])]] = True
    linked[0] = False
    # Pending pixels of one global component are linked or not as a whole: paint each linked
    # component inside its bounding box only, instead of a full-image lookup.
    for label in np.flatnonzero(linked):
        x, y, w, h = stats[label, :4]
        box = (slice(y, y + h), slice(x, x + w))
        edges[box] |= labels[box] == label
    return edges


def canny_reference(gray: np.ndarray, low: float, high: float) -> np.ndarray:
    """Whole-image Canny as a (H, W) bool map: the single-machine answer."""
    return cv2.Canny(gray, *whole_thresholds(low, high)) > 0
