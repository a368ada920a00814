"""`bilateral`: edge-preserving smoothing, `cv2.bilateralFilter(image, d, sigma_color, sigma_space)`."""

from __future__ import annotations

import cv2
import numpy as np

from luminagrid.ops.base import Operation, Param, Values
from luminagrid.workarounds import opencv_without_ipp


class Bilateral(Operation):
    name = "bilateral"
    summary = "Bilateral filter over a d x d neighbourhood; gray or colour."
    params = (
        # OpenCV derives d from sigma_space when d <= 0; an explicit d keeps cost and halo bounded.
        Param("d", int, 9, 1, 31, "neighbourhood diameter in pixels"),
        Param("sigma_color", float, 75.0, 0.1, 1000.0, "how different colours may be and still mix"),
        Param("sigma_space", float, 75.0, 0.1, 1000.0, "spatial falloff in pixels"),
    )
    suffix = "bilateral"

    def halo_rows(self, values: Values) -> int:
        return max(1, int(values["d"]) // 2)  # OpenCV's radius for d > 0 (at least 1, even for d = 1)

    def apply(self, pixels: np.ndarray, values: Values) -> np.ndarray:
        with opencv_without_ipp():  # IPP's variant is not local: strips would differ from the whole
            return cv2.bilateralFilter(pixels, int(values["d"]), float(values["sigma_color"]), float(values["sigma_space"]))


OP = Bilateral()
