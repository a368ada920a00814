"""Photo-like benchmark inputs: real edges and texture, not noise, at any size."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent


def photo_like(width: int, height: int) -> np.ndarray:
    """examples/coffee.png at 2x, mirror-tiled to (height, width, 3) uint8."""
    tile = cv2.imread(str(REPO / "examples" / "coffee.png"))
    tile = cv2.resize(tile, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    quad = np.vstack([np.hstack([tile, tile[:, ::-1]]), np.hstack([tile[::-1], tile[::-1, ::-1]])])
    reps = (-(-height // quad.shape[0]), -(-width // quad.shape[1]), 1)
    return np.ascontiguousarray(np.tile(quad, reps)[:height, :width])


def noisy(image: np.ndarray, sigma: float = 10.0) -> np.ndarray:
    """The photo with Gaussian sensor-like noise (what `denoise` is for), a band of rows at a
    time (a gigapixel image never has a float64 copy); seed 0, the same pixels as all at once."""
    rng = np.random.default_rng(0)
    out = np.empty_like(image)
    for r in range(0, image.shape[0], 512):
        band = image[r:r + 512]
        out[r:r + 512] = np.clip(band + rng.normal(0, sigma, band.shape), 0, 255).astype(np.uint8)
    return out
