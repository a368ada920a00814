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
   through other pending components) becomes an edge. Everything else pending is dropped. The
   stitcher works on the packed edge map and visits only pending pixels (a union-find over the
   strips' pending components), so its cost follows the seams, not the image size.

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


class Pending(NamedTuple):
    """A strip's pending pixels: (n,) int32 flat indices into its own rows, ascending, and (n,)
    int32 labels saying which of the strip's components each belongs to."""

    at: np.ndarray
    label: np.ndarray

    @staticmethod
    def none() -> Pending:
        return Pending(np.zeros(0, np.int32), np.zeros(0, np.int32))


class StripEdges(NamedTuple):
    """A strip's hysteresis, resolved as far as the strip alone allows. `edges` is (rows, width) bool."""

    edges: np.ndarray
    pending: Pending


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
    # One Sobel pass for both threshold runs, with the border OpenCV's Canny itself uses.
    dx = cv2.Sobel(gray, cv2.CV_16S, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE)
    dy = cv2.Sobel(gray, cv2.CV_16S, 0, 1, ksize=3, borderType=cv2.BORDER_REPLICATE)
    candidates = cv2.Canny(dx, dy, low, low)[halo_top:end]
    strong = cv2.Canny(dx, dy, high, high)[halo_top:end]
    count, labels = cv2.connectedComponents(candidates, connectivity=8, ltype=cv2.CV_32S)
    is_edge = np.zeros(count, bool)
    is_edge[labels[strong > 0]] = True
    is_edge[0] = False  # label 0 is the background
    edges = np.take(is_edge, labels)  # twice as fast as is_edge[labels]

    at_seam = np.zeros(count, bool)
    if seam_above:
        at_seam[labels[0]] = True
    if seam_below:
        at_seam[labels[-1]] = True
    at_seam[0] = False
    is_pending = at_seam & ~is_edge
    if not is_pending.any():
        return StripEdges(edges, Pending.none())
    flat = labels.ravel()
    at = np.flatnonzero(is_pending[flat]).astype(np.int32)
    return StripEdges(edges, Pending(at, flat[at]))


def _touching(row: np.ndarray) -> np.ndarray:
    """Pixels of a row 8-adjacent (across a seam) to a set pixel of `row`: its 1-pixel dilation."""
    near = row.copy()
    near[1:] |= row[:-1]
    near[:-1] |= row[1:]
    return near


def _row_of(packed: np.ndarray, y: int, width: int) -> np.ndarray:
    return np.unpackbits(packed[y], count=width).view(bool)


def _components(count: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of `count` nodes joined by edges a[i]-b[i]: each node's smallest member."""
    root = np.arange(count)
    while True:
        ra, rb = root[a], root[b]
        if np.array_equal(ra, rb):
            return root
        np.minimum.at(root, np.maximum(ra, rb), np.minimum(ra, rb))  # hook the larger root
        while True:  # then jump pointers until every node names its root
            jumped = root[root]
            if np.array_equal(jumped, root):
                break
            root = jumped


def finish_seams(packed: np.ndarray, width: int, parts: list[tuple[int, Pending]]) -> np.ndarray:
    """Resolve hysteresis across seams in place and return `packed`.

    `packed` is the whole edge map as `np.packbits(edges, axis=1)`, (H, ceil(W/8)) uint8; `parts`
    holds each strip's first row and pending pixels, top to bottom. A pending component becomes an
    edge when it touches an edge across a seam, directly or through other pending components.
    Only pending pixels are visited (tens of thousands at 8K), never the whole map.
    """
    if len(parts) < 2 or not any(p.at.size for _, p in parts):
        return packed
    nodes, total = [], 0  # each strip's pending components get global node ids
    for _, p in parts:
        uniq, inverse = np.unique(p.label, return_inverse=True)
        nodes.append(total + inverse.reshape(-1))
        total += uniq.size
    linked = np.zeros(total, bool)
    pairs_a, pairs_b = [], []
    for k in range(1, len(parts)):
        (above_row0, above), (y, below) = parts[k - 1], parts[k]
        # Pending pixels on the last row above the seam and on the first row below it.
        first = (y - 1 - above_row0) * width
        cut = np.searchsorted(above.at, first)
        xa, na = above.at[cut:] - first, nodes[k - 1][cut:]
        cut = np.searchsorted(below.at, width)
        xb, nb = below.at[:cut], nodes[k][:cut]
        if xa.size:
            linked[na[_touching(_row_of(packed, y, width))[xa]]] = True
        if xb.size:
            linked[nb[_touching(_row_of(packed, y - 1, width))[xb]]] = True
        if xa.size and xb.size:  # pending touching pending across the seam: one component
            node_at = np.full(width + 2, -1)
            node_at[xb + 1] = nb
            for dx in (0, 1, 2):
                other = node_at[xa + dx]
                pairs_a.append(na[other >= 0])
                pairs_b.append(other[other >= 0])
    if pairs_a:
        root = _components(total, np.concatenate(pairs_a), np.concatenate(pairs_b))
        linked_root = np.zeros(total, bool)
        linked_root[root[linked]] = True
        linked = linked_root[root]
    for (row0, p), node in zip(parts, nodes):
        px = p.at[linked[node]]
        rows, cols = row0 + px // width, px % width
        np.bitwise_or.at(packed, (rows, cols >> 3), np.right_shift(0x80, cols & 7).astype(np.uint8))
    return packed


def canny_reference(gray: np.ndarray, low: float, high: float) -> np.ndarray:
    """Whole-image Canny as a (H, W) bool map: the single-machine answer."""
    return cv2.Canny(gray, *whole_thresholds(low, high)) > 0
