"""`denoise`: non-local means, `cv2.fastNlMeansDenoising` (gray) or `...Colored` (colour)."""

from __future__ import annotations

import cv2
import numpy as np

from luminagrid.ops.base import Operation, Param, Values


class Denoise(Operation):
    name = "denoise"
    summary = "Non-local means denoising (fastNlMeansDenoising, or ...Colored for colour images)."
    params = (
        Param("h", float, 10.0, 0.1, 100.0, "filter strength for luminance (gray: the only one)"),
        Param("h_color", float, 10.0, 0.1, 100.0, "filter strength for colour (colour images only)"),
        Param("template_window", int, 7, 1, 15, "patch size in pixels", odd=True),
        Param("search_window", int, 21, 1, 35, "search area size in pixels", odd=True),
    )
    suffix = "denoise"

    def halo_rows(self, values: Values) -> int:
        # A pixel's patch (template) is compared with patches anywhere in its search window.
        return int(values["template_window"]) // 2 + int(values["search_window"]) // 2

    def apply(self, pixels: np.ndarray, values: Values) -> np.ndarray:
        t, s = int(values["template_window"]), int(values["search_window"])
        if pixels.ndim == 2:
            return cv2.fastNlMeansDenoising(pixels, None, float(values["h"]), t, s)
        return cv2.fastNlMeansDenoisingColored(pixels, None, float(values["h"]), float(values["h_color"]), t, s)


OP = Denoise()
