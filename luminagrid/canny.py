"""Exact strip-parallel Canny: the pure numpy/OpenCV core (no Celery in here).

Whole-image Canny = non-maximum suppression + thresholds + hysteresis. The first two are local
(a pixel depends on rows within 2 of it: Sobel 3x3, then NMS), so a strip with a 2-row halo gets
them exactly. Hysteresis is not local: a weak pixel is an edge when an 8-connected chain of weak
pixels links it to a strong one, however far away. So:

1. On each strip (worker): one `cv2.Canny` resolves hysteresis inside the strip's own rows
   (`canny_strip`; `_walled` keeps it out of the halo). Candidates (NMS maxima above `low`) that
   are not edges and whose component touches a seam row are *pending*: a neighbouring strip may
   link them to an edge. Only those are labelled, in bands beside the seams, so the work beyond
   OpenCV's own Canny follows the seams, not the strip.
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
    components touching such a seam can be pending. A side with a seam needs `HALO_NEEDED_ROWS`
    halo rows there (fewer where the image itself ends).

    1. One Sobel pass (`cv2.spatialGradient`) and one `cv2.Canny` on the gradients give the own
       rows' edges with hysteresis resolved inside the own rows alone (`_walled` keeps it out of
       the halo).
    2. Pending components touch a seam row and are candidates but not edges. Only those are
       labelled, in a band of rows beside each seam (`seam_bands`) that grows while one of them
       reaches its inner edge, so that work follows the seams, not the strip.
    """
    low, high = whole_thresholds(low, high)
    if not seam_above:  # no image above: a halo there would only be rows that do not exist
        gray, halo_top = gray[halo_top:], 0
    if not seam_below:
        gray, halo_bottom = gray[:gray.shape[0] - halo_bottom], 0
    if (seam_above and halo_top < 1) or (seam_below and halo_bottom < 1):
        raise ValueError(f"a strip beside a seam needs a halo row there, not {halo_top} above "
                         f"and {halo_bottom} below")
    rows = gray.shape[0] - halo_top - halo_bottom
    dx, dy = _walled(gray, halo_top, halo_bottom, seam_above, seam_below)
    top = 2 if seam_above else 0
    edges = cv2.Canny(dx, dy, low, high)[top:top + rows]
    np.bitwise_and(edges, 1, out=edges)  # 0/255 -> 0/1, viewed as bool
    if not (seam_above or seam_below):
        return StripEdges(edges.view(bool), Pending.none())
    bands = seam_bands(dx, dy, edges, top, low, seam_above, seam_below)
    at = np.concatenate([b.at for b in bands])
    if not at.size:
        return StripEdges(edges.view(bool), Pending.none())
    return StripEdges(edges.view(bool), Pending(at, np.concatenate([b.label for b in bands])))


#: Magnitude of the wall rows `_walled` puts beyond a seam: above any real one (at most 2040).
_WALL = 4096


def _walled(
    gray: np.ndarray, halo_top: int, halo_bottom: int, seam_above: bool, seam_below: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, width) int16 Sobel gradients of the own rows, plus two rows beyond each seam: the
    halo row beside the seam, then a wall row.

    Canny compares each pixel with its two neighbours along its gradient direction. The halo row
    keeps its real magnitude (what the own rows beside it are compared with) but points at the
    wall, which outweighs it: it is never a maximum, so never a candidate, and hysteresis cannot
    pass through it. The wall's own candidates touch nothing but that halo row.
    """
    dx, dy = cv2.spatialGradient(gray, borderType=cv2.BORDER_REPLICATE)
    pad = (max(0, 2 - halo_top) if seam_above else 0, max(0, 2 - halo_bottom) if seam_below else 0)
    if any(pad):  # a 1-row halo where the image ends: room for the wall
        dx, dy = (np.pad(a, (pad, (0, 0))) for a in (dx, dy))
    start = halo_top + pad[0] - (2 if seam_above else 0)
    stop = dx.shape[0] - (halo_bottom + pad[1]) + (2 if seam_below else 0)
    dx, dy = dx[start:stop], dy[start:stop]
    sides = ([(1, 0)] if seam_above else []) + ([(-2, -1)] if seam_below else [])
    for halo, wall in sides:
        dy[halo] = np.abs(dx[halo]) + np.abs(dy[halo])  # the same L1 magnitude, pointing at the wall
        dx[halo] = 0
        dx[wall], dy[wall] = 0, _WALL
    return dx, dy


def seam_bands(
    dx: np.ndarray, dy: np.ndarray, edges: np.ndarray, top: int, low: float,
    seam_above: bool, seam_below: bool,
) -> list[Pending]:
    """The pending components beside each seam of a strip (`canny_strip`'s second step), labels
    unique across the list.

    `dx`/`dy` are `_walled` gradients whose own rows start at `top`; `edges` the own rows' (rows,
    width) 0/1 uint8 edges. Each seam gets `_beside_seam`; where the two would meet, the strip is
    labelled whole.
    """
    rows = edges.shape[0]
    sides = []
    if 2 * _FIRST_BAND_ROWS + 2 < rows:
        for below, wanted in ((False, seam_above), (True, seam_below)):
            if wanted:
                side = _beside_seam(dx, dy, edges, top, low, below)
                if side is None:
                    break
                sides.append(side)
        else:
            out, offset = [], 0
            for pending, labels in sides:
                out.append(Pending(pending.at, pending.label + offset))
                offset += labels
            return out
    return [_whole(dx, dy, edges, top, low, seam_above, seam_below)]


#: Rows beside a seam labelled across the whole width first; components going deeper are
#: followed in the columns they reach.
_FIRST_BAND_ROWS = 16
#: Columns added either side of where a component leaves the columns followed so far.
_SIDE_COLUMNS = 32


def _weak(
    dx: np.ndarray, dy: np.ndarray, edges: np.ndarray, top: int, row0: int, row1: int,
    runs: list[tuple[int, int]], low: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Weak candidates (candidates that are not edges) of own rows `row0:row1`, in the columns of
    `runs` (sorted, disjoint, at least 3 columns apart), side by side: a (rows, n) 0/1 uint8 map
    and the (n,) image column of each of its columns (-1 between runs, always 0 there).

    Candidates are NMS maxima above `low`, from one Canny pass over the runs' gradients with a
    row and a column either side, exact for the runs. `edges` resolves whole components (one
    holding a strong pixel is an edge throughout), so candidates that are not edges are the weak
    ones.
    """
    width = edges.shape[1]
    lo, hi = max(0, top + row0 - 1), min(dx.shape[0], top + row1 + 1)
    own = slice(top + row0 - lo, top + row1 - lo)
    whole = runs == [(0, width)]
    if whole:
        column = np.arange(width)
        gx, gy, known = dx[lo:hi], dy[lo:hi], edges[row0:row1]
    else:
        starts, stops = np.array(runs).T
        spans_from, spans_to = np.maximum(starts - 1, 0), np.minimum(stops + 1, width)
        lengths = spans_to - spans_from
        # every column of every span with its margins, in one index array
        taken = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths - spans_from, lengths)
        inside = (taken >= np.repeat(starts, lengths)) & (taken < np.repeat(stops, lengths))
        column = np.where(inside, taken, -1)
        gx, gy, known = dx[lo:hi, taken], dy[lo:hi, taken], edges[row0:row1, taken]
    candidates = cv2.Canny(gx, gy, low, low)[own]
    # Candidates are 255, edges 1 (and always candidates): 254 marks an edge, 255 a weak pixel.
    weak = np.equal(candidates - known, 255).view(np.uint8)
    if not whole:
        weak[:, column < 0] = 0  # the margins: not exact, and they keep the runs apart
    return weak, column


def _pixels(weak: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """8-connected components of a 0/1 map: (count, labels, (n, 2) x, y of its set pixels in
    row-major order)."""
    count, labels = cv2.connectedComponentsWithAlgorithm(weak, 8, cv2.CV_32S, cv2.CCL_BBDT)
    xy = cv2.findNonZero(weak)
    return count, labels, (np.zeros((0, 2), np.int32) if xy is None else xy.reshape(-1, 2))


def _on_rows(count: int, labels: np.ndarray, first: bool, last: bool) -> np.ndarray:
    """(count,) bool: the components of `labels` (0 = background, never) with a pixel on its
    first row (`first`) or its last (`last`)."""
    touching = np.zeros(count, bool)
    if first:
        touching[labels[0]] = True
    if last:
        touching[labels[-1]] = True
    touching[0] = False
    return touching


def _runs(wanted: np.ndarray) -> list[tuple[int, int]]:
    """Runs of True in a (width,) bool array as (start, stop) pairs, runs less than 3 columns apart
    merged (`_weak` needs them apart)."""
    change = np.flatnonzero(np.diff(np.concatenate([[0], wanted.view(np.int8), [0]])))
    starts, stops = change[0::2], change[1::2]
    apart = np.flatnonzero(starts[1:] - stops[:-1] >= 3)
    first, last = np.concatenate([[0], apart + 1]), np.concatenate([apart, [stops.size - 1]])
    return list(zip(starts[first].tolist(), stops[last].tolist()))


def _around(columns: np.ndarray, width: int, reach: int) -> np.ndarray:
    """(width,) bool: True within `reach` columns of any of `columns`."""
    hit = np.zeros(width + 2 * reach + 1, np.int32)
    np.add.at(hit, columns + reach + 1, 1)
    total = np.cumsum(hit)
    return (total[2 * reach + 1:] - total[:width]) > 0


def _beside_seam(
    dx: np.ndarray, dy: np.ndarray, edges: np.ndarray, top: int, low: float, below: bool,
) -> tuple[Pending, int] | None:
    """Pending components touching the strip's first own row (or its last, `below`), and how many
    labels they may use; None if one may reach halfway to the other seam.

    The first `_FIRST_BAND_ROWS` rows are labelled across the width. Where a pending component
    reaches the band's inner edge, or the edge of the columns followed so far, the columns around
    it are followed deeper (4 bands, then twice as deep each time), side by side in one pass;
    components of both passes are joined where they share pixels (`_components`).
    """
    rows, width = edges.shape
    band = _FIRST_BAND_ROWS
    limit = (rows - 2) // 2  # deeper than this, the two seams' components could meet

    def own(depth: int) -> tuple[int, int]:  # own rows of the depths 0:depth from the seam
        return (rows - depth, rows) if below else (0, depth)

    r0, r1 = own(band)
    weak0, _ = _weak(dx, dy, edges, top, r0, r1, [(0, width)], low)
    count0, labels0, xy0 = _pixels(weak0)
    seam0 = _on_rows(count0, labels0, first=not below, last=below)
    if not seam0.any():
        return Pending.none(), count0
    label0 = labels0[xy0[:, 1], xy0[:, 0]]
    depth0 = (band - 1 - xy0[:, 1]) if below else xy0[:, 1]
    at0 = (xy0[:, 1] + r0) * width + xy0[:, 0]
    followed = np.zeros(width + 2, bool)  # by image column + 1 (the image's sides count as followed)
    followed[[0, -1]] = True
    root, node_seam = np.arange(count0, dtype=np.int32), seam0
    deep_at = deep_node = np.zeros(0, np.int32)
    depth = band
    frontier = (depth0 == band - 1) & seam0[label0]
    widen, deepen = xy0[frontier, 0], False
    while widen.size or deepen:
        if deepen and depth >= limit:
            return None
        depth = min(limit, max(2 * depth if deepen else depth, 4 * band))
        if depth <= band:
            return None
        followed[1:-1] |= _around(widen, width, _SIDE_COLUMNS)
        r0k, r1k = own(depth)
        weak, column = _weak(dx, dy, edges, top, r0k, r1k, _runs(followed[1:-1]), low)
        count, labels, xy = _pixels(weak)
        x, y = column[xy[:, 0]], xy[:, 1]
        d = (depth - 1 - y) if below else y
        label = labels[y, xy[:, 0]] + count0  # node ids after the band's
        # Join the two passes where they share pixels (the band's rows, in the followed columns).
        shared = d < band
        band_row = y[shared] + r0k - r0
        root = _components(count0 + count, labels0[band_row, x[shared]].astype(np.int32),
                           label[shared].astype(np.int32))
        node_seam = np.zeros(count0 + count, bool)
        node_seam[root[np.flatnonzero(seam0)]] = True
        node_seam = node_seam[root]
        # Where a pending component may go on: the band's inner edge outside the followed columns,
        # this pass's inner edge, and the followed columns' sides below the band.
        band_edge = (depth0 == band - 1) & node_seam[label0]
        xs = xy0[band_edge, 0]
        outside = ~(followed[xs] & followed[xs + 1] & followed[xs + 2])
        deep = (d >= band - 1) & node_seam[label]
        at_side = deep & ~(followed[x] & followed[x + 2])
        deepen = bool((deep & (d == depth - 1)).any())
        widen = np.concatenate([xs[outside], x[at_side]])
        keep = (d >= band) & node_seam[label]
        deep_at = ((y[keep] + r0k) * width + x[keep]).astype(np.int32)
        deep_node = label[keep]
    keep0 = node_seam[label0]
    at = np.concatenate([at0[keep0].astype(np.int32), deep_at])
    node = np.concatenate([label0[keep0], deep_node])
    order = np.argsort(at, kind="stable")
    return Pending(at[order], root[node[order]].astype(np.int32)), root.size


def _whole(
    dx: np.ndarray, dy: np.ndarray, edges: np.ndarray, top: int, low: float, first: bool, last: bool,
) -> Pending:
    """Pending components of a strip labelled whole: weak components touching its first own row
    (`first`) or its last (`last`)."""
    rows, width = edges.shape
    weak, _ = _weak(dx, dy, edges, top, 0, rows, [(0, width)], low)
    count, labels, xy = _pixels(weak)
    at_seam = _on_rows(count, labels, first, last)
    if not at_seam.any():
        return Pending.none()
    at = xy[:, 1] * width + xy[:, 0]
    label = labels[xy[:, 1], xy[:, 0]]
    keep = at_seam[label]
    return Pending(at[keep].astype(np.int32), label[keep].astype(np.int32))


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
