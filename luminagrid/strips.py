"""Cutting an image into horizontal strips with halos, and putting them back.

Every strip boundary and every halo edge lies on a multiple of `ALIGN_ROWS` (8) rows, or on the
image's own top or bottom. That alignment is what makes JPEG transport exact: a gray JPEG, or a
colour one without chroma subsampling (4:4:4, as `codec` writes it), decodes block by block (8x8),
so a strip's JPEG decodes to exactly the rows a whole-image JPEG would (FIELD-NOTES section 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: JPEG's block height: strip boundaries and halos are multiples of it.
ALIGN_ROWS = 8
#: Upper bound on strips per job (keeps chord bookkeeping and message counts small).
MAX_STRIPS = 1024
#: Target pixels per strip when the caller does not choose a count (operations may choose their own).
TARGET_STRIP_PIXELS = 1_000_000


@dataclass(frozen=True)
class Strip:
    """One band of rows. Rows are half-open ranges of the whole image.

    `row0:row1` are the rows this strip is responsible for; `top:bottom` are the rows sent to the
    worker (the strip plus up to `halo_rows` on each side, clipped at the image edges).
    """

    index: int
    row0: int
    row1: int
    top: int
    bottom: int

    @property
    def halo_top(self) -> int:
        return self.row0 - self.top

    @property
    def halo_bottom(self) -> int:
        return self.bottom - self.row1


def halo_for(needed_rows: int) -> int:
    """The smallest aligned halo (rows) that covers an operation's need of `needed_rows`."""
    return ALIGN_ROWS * math.ceil(needed_rows / ALIGN_ROWS)


def default_strip_count(height: int, width: int, target_pixels: int = TARGET_STRIP_PIXELS) -> int:
    """About `target_pixels` per strip, an even count (two workers get equal shares), at least two
    where the height allows."""
    wanted = max(2, math.ceil(height * width / target_pixels))
    wanted += wanted % 2
    return min(wanted, MAX_STRIPS, max_strips_for(height))


def max_strips_for(height: int) -> int:
    """How many aligned strips an image of `height` rows can be cut into (at least 1)."""
    return max(1, math.ceil(height / ALIGN_ROWS))


def plan_strips(height: int, count: int, halo_rows: int, align_rows: int = ALIGN_ROWS) -> list[Strip]:
    """Cut `height` rows into at most `count` strips of near-equal height, on a grid of
    `align_rows` rows (JPEG's 8; `exactness` cuts on every row, with halos of any size).

    When the image has fewer blocks than `count` (e.g. a 1-row image), fewer strips are made:
    a strip never has zero rows. `halo_rows` must be a multiple of `align_rows`.
    """
    if height < 1:
        raise ValueError(f"height must be >= 1, got {height}")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if halo_rows < 0 or halo_rows % align_rows:
        raise ValueError(f"halo_rows must be a non-negative multiple of {align_rows}, got {halo_rows}")
    blocks = math.ceil(height / align_rows)
    n = min(count, blocks)
    # Block boundaries spread as evenly as integers allow; every strip gets >= 1 block.
    edges = [min(height, align_rows * (i * blocks // n)) for i in range(n + 1)]
    return [
        Strip(
            index=i,
            row0=r0,
            row1=r1,
            top=max(0, r0 - halo_rows),
            bottom=min(height, r1 + halo_rows),
        )
        for i, (r0, r1) in enumerate(zip(edges, edges[1:]))
    ]
