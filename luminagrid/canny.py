"""Exact strip-parallel Canny: the pure numpy/OpenCV core (no Celery in here).

Whole-image Canny = non-maximum suppression + thresholds + hysteresis. The first two are local
(a pixel depends on rows within 2 of it: Sobel 3x3, then NMS), so a strip with a 2-row halo gets
them exactly. Hysteresis is not local: a weak pixel is an edge when an 8-connected chain of weak
pixels links it to a strong one, however far away. So:

1. On each strip (worker): `candidates` = NMS maxima above `low` (`cv2.Canny(dx, dy, low, low)`).
   Resolve hysteresis inside the strip: candidate components holding a strong pixel (magnitude
   above `high`) are edges. Components without one that touch a seam row are *pending*: a
   neighbouring strip may link them to an edge. Only the candidate pixels are visited after the
   labelling.
2. On the stitcher: a pending component that touches an edge pixel across a seam (directly, or
   through other pending components) becomes an edge. Everything else pending is dropped. The
   stitcher sees only the pending pixels *on* each strip's first and last row and the edge rows
   beside each seam (a union-find over the strips' pending components), so its cost and memory
   follow the seams, not the image; it says which components become edges, and whoever
   assembles the output sets their pixels, a strip at a time.

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

    One OpenCV Canny pass finds the candidates (NMS maxima above `low`), one labelling pass their
    8-connected components; everything after visits only the candidate pixels (a few percent of
    a photo): their magnitudes say which components hold a strong pixel (above `high`).
    """
    low, high = whole_thresholds(low, high)
    end = gray.shape[0] - halo_bottom
    # One Sobel pass, with the border OpenCV's Canny itself uses; the halo makes the own rows exact.
    dx = cv2.Sobel(gray, cv2.CV_16S, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE)
    dy = cv2.Sobel(gray, cv2.CV_16S, 0, 1, ksize=3, borderType=cv2.BORDER_REPLICATE)
    candidates = cv2.Canny(dx, dy, low, low)[halo_top:end]
    count, labels = cv2.connectedComponentsWithAlgorithm(candidates, 8, cv2.CV_32S, cv2.CCL_BBDT)
    return _hysteresis(candidates, labels, count, dx[halo_top:end], dy[halo_top:end], high, seam_above, seam_below)


def _hysteresis(
    candidates: np.ndarray, labels: np.ndarray, count: int, dx: np.ndarray, dy: np.ndarray, high: float,
    seam_above: bool, seam_below: bool,
) -> StripEdges:
    """Hysteresis inside a strip, visiting only its candidate pixels.

    `candidates` is (rows, width) uint8 (non-zero at candidates), `labels` their components
    (int32, 0 = background), `dx`/`dy` the own rows' int16 Sobel responses. A component is an
    edge if a pixel of it has an L1 magnitude above `high` (OpenCV's strong pixels); one without,
    touching a seam row, is pending.
    """
    rows, width = candidates.shape
    edges = np.zeros(rows * width, bool)
    if count <= 1:
        return StripEdges(edges.reshape(rows, width), Pending.none())
    xy = cv2.findNonZero(candidates).reshape(-1, 2)  # in row-major order: flat indices ascending
    at = xy[:, 1] * width + xy[:, 0]
    label = np.take(labels, at)
    magnitude = np.abs(np.take(dx, at)) + np.abs(np.take(dy, at))  # at most 2040: int16 holds it
    strong = np.zeros(count, bool)
    strong[label[magnitude > high]] = True
    edges[at[strong[label]]] = True
    at_seam = np.zeros(count, bool)
    if seam_above:
        at_seam[labels[0]] = True
    if seam_below:
        at_seam[labels[-1]] = True
    at_seam[0] = False
    pending = (at_seam & ~strong)[label]
    if not pending.any():
        return StripEdges(edges.reshape(rows, width), Pending.none())
    return StripEdges(edges.reshape(rows, width), Pending(at[pending].astype(np.int32), label[pending]))


def _unpacked(packed: np.ndarray, width: int) -> np.ndarray:
    return np.unpackbits(packed, count=width).view(bool)


def _touching(row: np.ndarray) -> np.ndarray:
    """Pixels of a row 8-adjacent (across a seam) to a set pixel of `row`: its 1-pixel dilation."""
    near = row.copy()
    near[1:] |= row[:-1]
    near[:-1] |= row[1:]
    return near


def _components(count: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of `count` nodes joined by edges a[i]-b[i]: each node's smallest member."""
    root = np.arange(count, dtype=np.int32)  # int32 throughout: this is the seam pass's peak memory
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


def on_seam_rows(pending: Pending, rows: int, width: int) -> Pending:
    """The pending pixels on a strip's first and last own row: all the seam pass reads."""
    near = (pending.at < width) | (pending.at >= (rows - 1) * width)
    return Pending(pending.at[near], pending.label[near])


def pixels_of(pending: Pending, labels: np.ndarray) -> np.ndarray:
    """Flat indices of the pending pixels whose component is among `labels` (ascending)."""
    return pending.at[np.isin(pending.label, labels)]


class Seams(NamedTuple):
    """What the seam pass needs of one strip: its own rows, its pending pixels on its first and
    last row (`on_seam_rows`; all of them also works), and its first and last own row of edges
    ((width,) bool each)."""

    rows: int
    pending: Pending
    #: the first and last own row of edges, packed (np.packbits: ceil(width/8) uint8 each)
    first: np.ndarray
    last: np.ndarray


def finish_seams(width: int, parts: list[Seams]) -> list[np.ndarray]:
    """Resolve hysteresis across seams: per strip (top to bottom), the labels (int32, ascending)
    of its pending components that become edges (`pixels_of` gives their pixels).

    A pending component becomes an edge when it touches an edge across a seam, directly or
    through other pending components. Only pending pixels and the rows beside each seam are
    visited, never a whole edge map.
    """
    none = [np.zeros(0, np.int32) for _ in parts]
    if len(parts) < 2 or not any(p.pending.at.size for p in parts):
        return none
    nodes, total = [], 0  # each strip's pending components get global node ids
    for p in parts:
        uniq, inverse = np.unique(p.pending.label, return_inverse=True)
        nodes.append((total + inverse.reshape(-1)).astype(np.int32))
        total += uniq.size
    linked = np.zeros(total, bool)
    pairs_a, pairs_b = [], []
    for k in range(1, len(parts)):
        above, below = parts[k - 1], parts[k]
        # Pending pixels on the last row above the seam and on the first row below it.
        first = (above.rows - 1) * width
        cut = np.searchsorted(above.pending.at, first)
        xa, na = above.pending.at[cut:] - first, nodes[k - 1][cut:]
        cut = np.searchsorted(below.pending.at, width)
        xb, nb = below.pending.at[:cut], nodes[k][:cut]
        if xa.size:
            linked[na[_touching(_unpacked(below.first, width))[xa]]] = True
        if xb.size:
            linked[nb[_touching(_unpacked(above.last, width))[xb]]] = True
        if xa.size and xb.size:  # pending touching pending across the seam: one component
            node_at = np.full(width + 2, -1, np.int32)
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
    return [np.unique(p.pending.label[linked[node]]).astype(np.int32) for p, node in zip(parts, nodes)]


def set_edges(packed: np.ndarray, at: np.ndarray, width: int) -> np.ndarray:
    """Set the pixels `at` (flat indices) in a packed edge map ((rows, ceil(width/8)) uint8), in place."""
    if at.size:
        rows, cols = at // width, at % width
        np.bitwise_or.at(packed, (rows, cols >> 3), np.right_shift(0x80, cols & 7).astype(np.uint8))
    return packed


def canny_reference(gray: np.ndarray, low: float, high: float) -> np.ndarray:
    """Whole-image Canny as a (H, W) bool map: the single-machine answer."""
    return cv2.Canny(gray, *whole_thresholds(low, high)) > 0
