"""The strip plan: aligned, contiguous, never empty, whatever the height and count."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from luminagrid.strips import ALIGN_ROWS, MAX_STRIPS, default_strip_count, halo_for, plan_strips


@given(height=st.integers(1, 5000), count=st.integers(1, 300))
def test_strips_tile_the_image_on_aligned_boundaries(height: int, count: int) -> None:
    plan = plan_strips(height, count, halo_rows=8)
    assert 1 <= len(plan) <= count
    assert plan[0].row0 == 0 and plan[-1].row1 == height
    for a, b in zip(plan, plan[1:]):
        assert a.row1 == b.row0
    for s in plan:
        assert s.row1 > s.row0
        assert s.row0 % ALIGN_ROWS == 0 and s.top % ALIGN_ROWS == 0
        assert s.row1 == height or s.row1 % ALIGN_ROWS == 0
        assert s.bottom == height or s.bottom % ALIGN_ROWS == 0
        assert s.halo_top == min(8, s.row0) and s.halo_bottom == min(8, height - s.row1)


def test_more_strips_than_rows_gives_one_strip_per_block() -> None:
    assert [(s.row0, s.row1) for s in plan_strips(1, 5, 8)] == [(0, 1)]
    assert len(plan_strips(17, 40, 8)) == 3


def test_strips_are_balanced_within_one_block() -> None:
    heights = [s.row1 - s.row0 for s in plan_strips(4320, 7, 8)]
    assert max(heights) - min(heights) <= ALIGN_ROWS


def test_halo_rounds_up_to_the_block() -> None:
    assert [halo_for(n) for n in (0, 1, 2, 8, 9)] == [0, 8, 8, 8, 16]


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [(1, 1, 1), (16, 100, 2), (480, 640, 2), (4320, 7680, 34), (100_000, 100_000, MAX_STRIPS)],
)
def test_default_strip_count_scales_with_pixels(height: int, width: int, expected: int) -> None:
    assert default_strip_count(height, width) == expected


@pytest.mark.parametrize(("height", "count", "halo"), [(0, 1, 8), (10, 0, 8), (10, 1, 3)])
def test_bad_plans_are_refused(height: int, count: int, halo: int) -> None:
    with pytest.raises(ValueError):
        plan_strips(height, count, halo)
