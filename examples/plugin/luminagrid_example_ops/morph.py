"""`morph`: morphology with a square kernel, `cv2.morphologyEx(image, mode, kernel)`."""

from __future__ import annotations

import cv2
import numpy as np

from luminagrid.ops import Operation, Param, Values

MODES = {"open": cv2.MORPH_OPEN, "close": cv2.MORPH_CLOSE, "gradient": cv2.MORPH_GRADIENT}


class Morph(Operation):
    name = "morph"
    summary = "Morphological open, close or gradient with a ksize x ksize square kernel; gray or colour."
    params = (
        Param.choice("mode", tuple(MODES), "open", "open (erode, dilate), close (dilate, erode) or gradient"),
        Param("ksize", int, 5, 3, 31, "kernel side in pixels", odd=True),
    )
    suffix = "morph"

    def halo_rows(self, values: Values) -> int:
        radius = int(values["ksize"]) // 2
        # open and close are two passes, each reaching `radius` rows; gradient's two run side by side.
        return radius if values["mode"] == "gradient" else 2 * radius

    def apply(self, pixels: np.ndarray, values: Values) -> np.ndarray:
        k = int(values["ksize"])
        return cv2.morphologyEx(pixels, MODES[str(values["mode"])], np.ones((k, k), np.uint8))


OP = Morph()
