"""`gaussian`: Gaussian blur, `cv2.GaussianBlur(image, (0, 0), sigma)`, gray or colour."""

from __future__ import annotations

import cv2
import numpy as np

from luminagrid.ops.base import Operation, Param, Values


def kernel_size(sigma: float) -> int:
    """The kernel OpenCV derives from sigma for 8-bit images (`createGaussianKernels`)."""
    return round(sigma * 3 * 2 + 1) | 1


class Gaussian(Operation):
    name = "gaussian"
    summary = "Gaussian blur; the kernel spans about 3 sigma each side, as OpenCV chooses it."
    params = (Param("sigma", float, 2.0, 0.1, 50.0, "standard deviation in pixels"),)
    suffix = "gaussian"
    strip_pixels = 1_000_000  # cheap per pixel, like Canny

    def halo_rows(self, values: Values) -> int:
        return kernel_size(float(values["sigma"])) // 2

    def apply(self, pixels: np.ndarray, values: Values) -> np.ndarray:
        return cv2.GaussianBlur(pixels, (0, 0), float(values["sigma"]))


OP = Gaussian()
