"""`median`: median filter, `cv2.medianBlur(image, ksize)`, gray or colour."""

from __future__ import annotations

import cv2
import numpy as np

from luminagrid.ops import Operation, Param, Values


class Median(Operation):
    name = "median"
    summary = "Median filter over a ksize x ksize square (cv2.medianBlur); gray or colour."
    params = (Param("ksize", int, 5, 3, 15, "window side in pixels", odd=True),)
    suffix = "median"  # output: <stem>.median.png

    def halo_rows(self, values: Values) -> int:
        # An output pixel is the median of the ksize rows centred on it: ksize // 2 above and below.
        return int(values["ksize"]) // 2

    def apply(self, pixels: np.ndarray, values: Values) -> np.ndarray:
        # pixels: (H, W) uint8 gray, or (H, W, 3) uint8 BGR for a colour input (set `colour = False`: always gray)
        return cv2.medianBlur(pixels, int(values["ksize"]))


OP = Median()
