"""`exactness` (what `cli.py check-op` runs) on the built-in operations across their whole
parameter ranges, and on operations whose halo is one row short, which it must catch."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import run
from test_ops import PARAMS

from luminagrid import exactness, messages, ops
from luminagrid.codec import Codec
from luminagrid.errors import InputError, OperationUnavailable
from luminagrid.ops.base import Operation, Param, Values

BUILT_IN = ["canny", "gaussian", "bilateral", "denoise"]
#: check-op needs no Redis: none is configured
ENV = {k: v for k, v in os.environ.items() if not k.startswith("LUMINAGRID_")}


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_built_in_operation_is_exact_at_the_ends_of_its_parameter_ranges(name: str) -> None:
    op = ops.get(name)
    report = exactness.check(op, find_smallest=False)  # (bisecting below each declared halo doubles the time)
    assert report.ok, [str(v.failure) for v in report.verdicts if not v.ok]
    for p in op.params:  # each end of each range was tried
        tried = {v.values[p.name] for v in report.verdicts}
        assert set(p.ends) <= tried, (p.name, tried)
    for v in report.verdicts:
        assert v.cases == len(list(exactness.iter_cases(op, v.values)))


@pytest.mark.parametrize("name", BUILT_IN)
@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_every_built_in_operation_is_exact_anywhere_in_its_parameter_ranges(name: str, data: st.DataObject) -> None:
    op = ops.get(name)
    values = op.values(data.draw(PARAMS[name]))
    verdict = exactness.check_values(op, values, find_smallest=False)
    assert verdict.ok, str(verdict.failure)


class OneShort(Operation):
    """A local built-in operation (the default strip path) that declares one row less halo than it has."""

    def __init__(self, inner: Operation) -> None:
        self.inner = inner
        self.name, self.summary, self.params, self.colour = inner.name, inner.summary, inner.params, inner.colour

    def halo_rows(self, values: Values) -> int:
        return self.inner.halo_rows(values) - 1

    def apply(self, pixels: np.ndarray, values: Values) -> np.ndarray:
        return self.inner.apply(pixels, values)


@pytest.mark.parametrize(("name", "given"), [
    ("bilateral", {"d": 9}), ("bilateral", {"d": 31}), ("denoise", {"search_window": 5, "template_window": 3}),
    ("denoise", {}), ("gaussian", {"sigma": 2.0}),
])
def test_a_halo_one_row_short_is_caught_with_the_halo_that_was_needed(name: str, given: dict) -> None:
    real = ops.get(name)
    op = OneShort(real)
    values = op.values(given)
    verdict = exactness.check_values(op, values)
    assert not verdict.ok and verdict.declared_rows == real.halo_rows(values) - 1
    assert verdict.smallest_rows == real.halo_rows(values)
    assert verdict.failure is not None and verdict.failure.halo_rows == verdict.declared_rows
    assert f"with a halo of {exactness.rows(verdict.declared_rows)}: " in str(verdict.failure) and "differ, the first at row" in str(verdict.failure)


class Global(Operation):
    """Not local at all: every pixel becomes the image's mean."""

    name, summary = "meanfill", "the mean everywhere"

    def halo_rows(self, values: Values) -> int:
        return 3

    def apply(self, pixels: np.ndarray, values: Values) -> np.ndarray:
        return np.full_like(pixels, int(pixels.mean()))


def test_an_operation_no_halo_can_make_exact_is_reported_so() -> None:
    verdict = exactness.check_values(Global(), {})
    assert not verdict.ok
    # Each image is a few times taller than the halo tried: no halo makes its strips whole.
    assert verdict.smallest_rows is None and verdict.searched_rows == exactness.SEARCH_MIN_ROWS


def test_an_operation_that_raises_is_a_failed_case_naming_the_error() -> None:
    class Raises(Global):
        def apply(self, pixels: np.ndarray, values: Values) -> np.ndarray:
            if pixels.shape[0] < 3:
                raise ValueError("needs 3 rows")
            return pixels

    verdict = exactness.check_values(Raises(), {}, find_smallest=False)
    assert not verdict.ok and "apply on the whole image raised ValueError: needs 3 rows" in str(verdict.failure)


def test_parameter_sets_cover_each_end_and_every_choice_with_the_numbers_low_and_high() -> None:
    class Two(Global):
        params = (Param.choice("mode", ("a", "b"), "a", "m"), Param("k", int, 5, 3, 9, "k", odd=True),
                  Param("s", float, 1.0, 0.5, 2.0, "s"))

    sets = exactness.parameter_sets(Two(), {})
    assert sets[0] == {"mode": "a", "k": 5, "s": 1.0}
    for want in ({"mode": "b", "k": 5, "s": 1.0}, {"mode": "a", "k": 9, "s": 1.0}, {"mode": "a", "k": 5, "s": 0.5},
                 {"mode": "b", "k": 3, "s": 0.5}, {"mode": "b", "k": 9, "s": 2.0}, {"mode": "a", "k": 9, "s": 2.0}):
        assert want in sets
    assert len(sets) == len({tuple(sorted(s.items())) for s in sets})
    held = exactness.parameter_sets(Two(), {"k": 7})
    assert all(s["k"] == 7 for s in held) and {s["mode"] for s in held} == {"a", "b"}


def test_choice_parameters_parse_and_refuse_with_the_choices() -> None:
    p = Param.choice("mode", ("open", "close"), "open", "how")
    assert p.parse(" close ", "morph") == "close" and p.ends == ("open", "close") and p.range_text == "open|close"
    with pytest.raises(InputError, match=r"--op morph: parameter mode='shut' is not one of its choices; use one "
                                             r"of open, close \(default open\)\."):
        p.parse("shut", "morph")


@pytest.mark.parametrize(("op", "problem"), [
    (type("NoApply", (Operation,), {"name": "x", "summary": "s", "halo_rows": lambda self, v: 1})(),
     "it does not define `apply(pixels, values)`"),
    (Global(), "its name is 'meanfill', not the entry point's name 'x'"),
    (type("BadDefault", (Global,), {"name": "x", "params": (Param("k", int, 4, 3, 9, "k", odd=True),)})(),
     "parameter 'k''s default does not pass its own check"),
    (type("FloatHalo", (Global,), {"name": "x", "halo_rows": lambda self, v: 2.5})(),
     "halo_rows() at the defaults is 2.5, not a whole number of rows"),
    (type("Huge", (Global,), {"name": "x", "halo_rows": lambda self, v: 10**6})(), "from 0 to 4096"),
    (type("IntDefault", (Global,), {"name": "x", "params": (Param("s", float, 2, 0, 9, "s"),)})(),
     "parameter 's''s default 2 is not a float (write 2.0)"),
    (type("BadSuffix", (Global,), {"name": "x", "suffix": "../x"})(), "its suffix '../x' (output <stem>.<suffix>.png) is not"),
])
def test_a_plugin_operation_with_a_mistake_is_refused_with_the_reason(op: Operation, problem: str) -> None:
    assert any(problem in p for p in ops.problems(op, "x")), ops.problems(op, "x")


def test_a_usable_operation_has_no_problems_and_its_suffix_defaults_to_its_name() -> None:
    fine = type("Fine", (Global,), {"name": "x", "params": (Param.choice("m", ("a", "b"), "b", "m"),)})()
    assert ops.problems(fine, "x") == [] and fine.suffix == "x"
    assert all(ops.problems(op, name) == [] for name, op in ops.REGISTRY.items())


def test_a_halo_out_of_bounds_at_some_parameters_fails_the_job_at_submit() -> None:
    class Grows(Global):
        name = "meanfill"
        params = (Param("k", int, 1, 1, 10**6, "k"),)

        def halo_rows(self, values: Values) -> int:
            return int(values["k"])

    op = Grows()
    ops.REGISTRY["meanfill"], ops._ORIGINS["meanfill"] = op, ops.BUILT_IN
    try:
        with pytest.raises(OperationUnavailable, match=r"operation meanfill \(luminagrid .*\) declares a halo of 5000 rows "
                                                       r"at \{'k': 5000\}; a halo must be a whole number of rows from 0 to 4096"):
            messages.JobSpec.create(op, op.values({"k": 5000}), id="x", width=1, height=1, channels=1, strips=1,
                                    codec=Codec.lossless, quality=95)
    finally:
        del ops.REGISTRY["meanfill"], ops._ORIGINS["meanfill"]


def test_check_op_on_a_built_in_prints_each_parameter_set_and_exits_0() -> None:
    proc = run(["check-op", "bilateral", "-p", "d=5"], ENV)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"check-op bilateral ({ops.origin('bilateral')}): strips cut on every row")
    assert "  ok   d=5 sigma_color=75 sigma_space=75: declared halo 2 rows, smallest identical 2; 36 cases" in lines
    assert all("d=5 " in line for line in lines if line.startswith("  ok"))
    assert lines[-1].startswith("ok: bilateral on strips is identical to the whole image in all 252 cases at 7")


@pytest.mark.parametrize(("args", "message"), [
    (["check-op", "sharpen"], "error: unknown operation --op 'sharpen'; choose one of: canny"),
    (["check-op", "denoise", "-p", "search_window=4"], "error: --op denoise: parameter search_window='4' is out of range"),
    (["check-op", "gaussian", "-p", "sigma"], "error: -p 'sigma' is not NAME=VALUE"),
])
def test_check_op_refuses_bad_names_and_parameters(args: list[str], message: str) -> None:
    proc = run(args, ENV)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr
