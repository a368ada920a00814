"""`canny`: exact Canny edges of the gray image (see `luminagrid.canny` for how strips stay exact)."""

from __future__ import annotations

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
    global_pass = True  # hysteresis links pixels across any distance
    suffix = "edges"
    strip_pixels = 1_000_000  # cheap per pixel: small strips keep latency low
    fields = ("edges", "pending")

    def check(self, values: Values) -> None:
        if values["low"] > values["high"]:
            raise InputError(f"--op canny: low {values['low']:g} is above high {values['high']:g}; make low <= high.")

    def halo_rows(self, values: Values) -> int:
        return canny.HALO_NEEDED_ROWS

    def apply(self, pixels: np.ndarray, values: Values) -> np.ndarray:
        return canny.canny_reference(pixels, values["low"], values["high"]).astype(np.uint8) * np.uint8(255)

    def compute(self, pixels: np.ndarray, strip: Strip, height: int, values: Values) -> canny.StripEdges:
        return canny.canny_strip(
            pixels, strip.halo_top, strip.halo_bottom, values["low"], values["high"],
            seam_above=strip.row0 > 0, seam_below=strip.row1 < height,
        )

    def pack(self, result: canny.StripEdges) -> dict[str, Any]:
        return {"edges": codec.pack_bits(result.edges), "pending": codec.pack_pending(result.pending)}

    def stitch(self, parts: list[dict[str, Any]], width: int, channels: int) -> dict[str, Any]:
        # Strips' packed rows concatenate to the whole packed map (np.packbits pads each row).
        packed = np.concatenate([codec.unpack_rows(p["edges"], p["row1"] - p["row0"], width) for p in parts])
        pending = [codec.unpack_pending(p["pending"], p["row1"] - p["row0"], width) for p in parts]
        canny.finish_seams(packed, width, [(p["row0"], q) for p, q in zip(parts, pending)])
        return {"edges": codec.pack_rows(packed)}

    def collect(self, stitched: dict[str, Any], height: int, width: int, channels: int) -> np.ndarray:
        # One lookup from packed bytes to 0/255 bytes: faster than unpackbits, then * 255.
        packed = codec.unpack_rows(stitched["edges"], height, width)
        edges = _BYTE_TO_PIXELS[packed].reshape(height, -1)
        if edges.shape[1] != width:  # rows are padded to whole bytes
            edges = np.ascontiguousarray(edges[:, :width])
        return edges


OP = Canny()
