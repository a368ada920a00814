"""`canny`: exact Canny edges of the gray image (see `luminagrid.canny` for how strips stay exact)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from luminagrid import canny, codec
from luminagrid.errors import InputError
from luminagrid.ops.base import Operation, Param, Values
from luminagrid.strips import Strip

#: Packed byte -> its 8 pixels as 0/255, most significant bit first (np.packbits order).
_BYTE_TO_PIXELS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1) * np.uint8(255)


class Canny(Operation):
    name = "canny"
    summary = "Canny edges of the gray image (L1 gradient, 3x3 Sobel); output 0/255."
    params = (
        Param("low", float, 100.0, 0, canny.MAX_THRESHOLD, "hysteresis low threshold"),
        Param("high", float, 200.0, 0, canny.MAX_THRESHOLD, "hysteresis high threshold (>= low)"),
    )
    colour = False
    bilevel = True
    suffix = "edges"
    # Tall strips: the seam work (`canny.seam_bands`) is a band of rows per seam, so it costs
    # less per pixel the taller the strip (bench/canny_strip.py: 1.9x cv2.Canny at 128 rows, 1.3x
    # at 432). 4 MP still cuts an 8K image into 10 strips that stream while it is read.
    strip_pixels = 4_000_000
    # A megapixel of Canny takes ~3 ms; a strip's round trip through Redis and Celery ~2 ms more.
    one_strip_pixels = 1_000_000
    fields = ("edges", "pending", "seam_pending", "first", "last", "labels")
    # Hysteresis links pixels across any distance: the seam pass needs each strip's pending pixels
    # on its first and last row and its edge rows beside the seams, never its whole edge map nor
    # all its pending pixels (whoever writes the output fetches those, a strip at a time).
    stitch_fields = ("seam_pending", "first", "last")

    def check(self, values: Values) -> None:
        if float(values["low"]) > float(values["high"]):
            raise InputError(f"--op canny: low {values['low']:g} is above high {values['high']:g}; make low <= high.")

    def halo_rows(self, values: Values) -> int:
        return canny.HALO_NEEDED_ROWS

    def apply(self, pixels: np.ndarray, values: Values) -> np.ndarray:
        return canny.canny_reference(pixels, float(values["low"]), float(values["high"])).astype(np.uint8) * np.uint8(255)

    def compute(self, pixels: np.ndarray, strip: Strip, height: int, values: Values) -> canny.StripEdges:
        return canny.canny_strip(
            pixels, strip.halo_top, strip.halo_bottom, float(values["low"]), float(values["high"]),
            seam_above=strip.row0 > 0, seam_below=strip.row1 < height,
        )

    def pack(self, result: canny.StripEdges) -> dict[str, Any]:
        edges = result.edges
        rows, width = edges.shape
        return {
            "edges": codec.pack_bits(edges), "pending": codec.pack_pending(result.pending),
            "seam_pending": codec.pack_pending(canny.on_seam_rows(result.pending, rows, width)),
            # LZ4 too: the chord join and the stitch hold every strip's seam rows at once
            "first": codec.pack_bits(edges[:1]), "last": codec.pack_bits(edges[-1:]),
        }

    def stitch(self, parts: list[dict[str, Any]], width: int, channels: int) -> dict[str, Any]:
        """The seam pass: which pending components of each strip become edges. The strips' edge
        maps and pending pixels are handed on untouched (bytes or claims); whoever assembles the
        output sets those components' pixels."""
        def row(data: Any) -> np.ndarray:
            if not isinstance(data, bytes):
                raise codec.CodecError(f"a seam row is {type(data).__name__}, not bytes")
            return codec.unpack_rows(data, 1, width)[0]  # packed: the seam pass unpacks the rows it needs

        seams = [
            canny.Seams(p["row1"] - p["row0"], codec.unpack_pending(p["seam_pending"], p["row1"] - p["row0"], width),
                        row(p["first"]), row(p["last"]))
            for p in parts
        ]
        labels = canny.finish_seams(width, seams)
        return {"edges": [p["edges"] for p in parts], "pending": [p["pending"] for p in parts],
                "rows": [s.rows for s in seams], "labels": [codec.pack_indices(at) for at in labels]}

    def packed_rows(self, stitched: dict[str, Any], width: int) -> Iterator[np.ndarray]:
        """The output's packed rows (np.packbits layout), strip by strip, seams resolved: what a 1-bit
        PNG holds, without ever the whole image in memory."""
        rows, labels, pending = stitched["rows"], stitched["labels"], stitched["pending"]
        if not (len(rows) == len(labels) == len(pending) == len(stitched["edges"])):
            raise codec.CodecError(f"{len(stitched['edges'])} strips of edges for {len(rows)} strips")
        for data, count, linked, waiting in zip(stitched["edges"], rows, labels, pending):
            count = int(count)
            packed = codec.unpack_rows(data() if callable(data) else data, count, width)
            linked_labels = codec.unpack_indices(linked, count * width)
            if linked_labels.size:  # only then are its pending pixels fetched (and its rows copied, to set them)
                strip_pending = codec.unpack_pending(waiting() if callable(waiting) else waiting, count, width)
                packed = canny.set_edges(packed.copy(), canny.pixels_of(strip_pending, linked_labels), width)
            yield packed

    def collect(self, stitched: dict[str, Any], height: int, width: int, channels: int) -> np.ndarray:
        rows = [int(r) for r in stitched["rows"]]
        if sum(rows) != height:
            raise codec.CodecError(f"strip outputs of {rows} rows do not make {height} rows")
        edges = np.empty((height, width), np.uint8)
        top = 0
        for packed in self.packed_rows(stitched, width):
            # One lookup from packed bytes to 0/255 bytes: faster than unpackbits, then * 255.
            edges[top:top + packed.shape[0]] = _BYTE_TO_PIXELS[packed].reshape(packed.shape[0], -1)[:, :width]
            top += packed.shape[0]
        return edges


OP = Canny()
