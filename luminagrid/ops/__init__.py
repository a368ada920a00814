"""The operations luminagrid can distribute, by name: the built-in ones and those that installed
packages register under the entry-point group `luminagrid.ops`.

A package adds operations with, in its `pyproject.toml`:

    [project.entry-points."luminagrid.ops"]
    median = "my_package.median:OP"     # an `Operation` instance whose `name` is "median"

Every process that imports this module (the submitter, each worker) loads them once, at start.
Each operation comes with its `Origin` (the package and version that provide it): a job carries
it, and a worker with another version refuses the job's strips (`messages.resolve`), because
the output is exact only if every node runs the same code. An entry point that fails to load or
does not describe a usable operation is not registered; `broken()` says why (`cli.py ops`
prints it, and asking for that operation repeats it).
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
from dataclasses import dataclass

from luminagrid.errors import InputError, OperationUnavailable
from luminagrid.ops import bilateral, canny, denoise, gaussian
from luminagrid.ops.base import MAX_CHOICE_CHARS, Operation, Param, Value, Values
from luminagrid.settings import DEFAULT_OP

GROUP = "luminagrid.ops"
#: What an operation may be called: it travels in messages, task labels and file names.
NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
#: Largest halo (rows) an operation may ask for, at any parameters; the messages check it.
MAX_HALO_ROWS = 4096
#: Most parameters, and most result fields, an operation may have (bounds of every message).
MAX_PARAMS = 32
MAX_FIELDS = 16
DEFAULT = DEFAULT_OP
log = logging.getLogger(__name__)

__all__ = ["DEFAULT", "GROUP", "REGISTRY", "Operation", "Origin", "Param", "Value", "Values", "broken", "canonical",
           "check_halo", "get", "log_broken", "origin"]


@dataclass(frozen=True)
class Origin:
    """Where an operation's code comes from: a distribution (`pip show` name) and its version."""

    package: str
    version: str
    #: the entry point that registered it ("median = my_package.median:OP"); None if built in
    entry_point: str | None = None

    def __str__(self) -> str:
        return f"{self.package} {self.version}"


def _own_version() -> str:
    try:
        return importlib.metadata.version("luminagrid")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


BUILT_IN = Origin("luminagrid", _own_version())
REGISTRY: dict[str, Operation] = {m.OP.name: m.OP for m in (canny, gaussian, bilateral, denoise)}
_ORIGINS: dict[str, Origin] = {name: BUILT_IN for name in REGISTRY}
#: operation name (or entry-point name) -> why its entry point was not registered
_BROKEN: dict[str, str] = {}


def problems(op: object, name: str) -> list[str]:
    """What makes `op` unusable as the operation `name` (empty if nothing): the checks a plugin
    passes before it is registered, so that a mistake shows at start, not in the middle of a job."""
    if not isinstance(op, Operation):
        return [f"it is a {type(op).__name__}, not an instance of luminagrid.ops.Operation"]
    found = []
    if getattr(op, "name", None) != name:
        found.append(f"its name is {getattr(op, 'name', None)!r}, not the entry point's name {name!r}")
    if not NAME.fullmatch(name):
        found.append(f"name {name!r} is not 1-32 lowercase letters, digits or _, starting with a letter")
    if not isinstance(getattr(op, "summary", None), str):
        found.append("it has no `summary` (a one-line description)")
    if type(op).apply is Operation.apply:
        found.append("it does not define `apply(pixels, values)`")
    suffix = getattr(op, "suffix", "")
    if not isinstance(suffix, str) or not NAME.fullmatch(suffix):
        found.append(f"its suffix {suffix!r} (output <stem>.<suffix>.png) is not 1-32 lowercase letters, digits or _")
    fields = getattr(op, "fields", None)
    if not isinstance(fields, tuple) or not 0 < len(fields) <= MAX_FIELDS or not all(
            isinstance(f, str) and NAME.fullmatch(f) for f in fields):
        found.append(f"its fields {fields!r} are not a tuple of 1-{MAX_FIELDS} names")
    params = getattr(op, "params", None)
    if not isinstance(params, tuple) or not all(isinstance(p, Param) for p in params) or len(params) > MAX_PARAMS:
        return [*found, f"`params` is not a tuple of at most {MAX_PARAMS} luminagrid.ops.Param"]
    for p in params:
        if not isinstance(p.name, str) or not NAME.fullmatch(p.name):
            found.append(f"parameter name {p.name!r} is not 1-32 lowercase letters, digits or _")
            continue
        if p.kind not in (int, float, str):
            found.append(f"parameter {p.name!r} has kind {p.kind!r}; use int, float, or Param.choice")
        elif p.kind is str and not (p.choices and all(isinstance(c, str) and 0 < len(c) <= MAX_CHOICE_CHARS
                                                       for c in p.choices)):
            found.append(f"parameter {p.name!r} needs choices of 1-{MAX_CHOICE_CHARS} characters")
        else:
            try:
                parsed = p.parse(p.default, name)
                if parsed != p.default or type(parsed) is not type(p.default):
                    found.append(f"parameter {p.name!r}'s default {p.default!r} is not a {p.kind.__name__} "
                                 f"(write {parsed!r})")
            except InputError as exc:
                found.append(f"parameter {p.name!r}'s default does not pass its own check: {exc}")
    if found:
        return found
    try:
        halo = op.halo_rows(op.values({}))
    except Exception as exc:  # noqa: BLE001 - a plugin's own bug: reported, not raised
        return [f"halo_rows() at the defaults raised {type(exc).__name__}: {exc}"]
    if not _is_halo(halo):
        return [f"halo_rows() at the defaults is {halo!r}, not a whole number of rows from 0 to {MAX_HALO_ROWS}"]
    return []  # (at other values the submitter checks the halo of each job: `check_halo`)


def _register(entry: importlib.metadata.EntryPoint) -> None:
    dist = entry.dist
    where = Origin(dist.name if dist else "an unnamed package", dist.version if dist else "?",
                   f"{entry.name} = {entry.value}")
    if entry.name in _ORIGINS:  # (kept under its package's name too: the one registered works)
        _BROKEN[f"{entry.name} of {where.package}"] = (
            f"{where} registers operation {entry.name!r} ({entry.value}), which {_ORIGINS[entry.name]} provides "
            "already; uninstall one of the two packages")
        return
    try:
        op = entry.load()
    except Exception as exc:  # noqa: BLE001 - any error in a plugin's import is reported, not raised
        _BROKEN[entry.name] = f"{where}: loading {entry.value} raised {type(exc).__name__}: {exc}"
        return
    found = problems(op, entry.name)
    if found:
        _BROKEN[entry.name] = f"{where}: {entry.value} is not a usable operation: {'; '.join(found)}"
        return
    REGISTRY[entry.name] = op
    _ORIGINS[entry.name] = where


def _load_plugins() -> None:
    """Register every entry point of group `luminagrid.ops` (at import: the end of this module,
    so a plugin may import anything from it)."""
    for entry in sorted(importlib.metadata.entry_points(group=GROUP), key=lambda e: e.name):
        _register(entry)


def log_broken() -> None:
    """Log a warning per entry point that was not registered (a worker does, once it is up)."""
    for name, why in _BROKEN.items():
        log.warning("operation %s is not available: %s", name, why)


def get(name: str) -> Operation:
    """The operation called `name`; `OperationUnavailable` if its package failed to load, else
    `InputError` listing the known ones."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        if isinstance(name, str) and name in _BROKEN:
            raise OperationUnavailable(f"operation {name!r} is installed but unusable: {_BROKEN[name]}.") from None
        raise InputError(f"unknown operation --op {name!r}; choose one of: {', '.join(REGISTRY)} "
                         "(`python cli.py ops` lists them; more come from installed packages).") from None


def origin(name: str) -> Origin:
    """The package and version that provide operation `name` (known to `REGISTRY`)."""
    return _ORIGINS[name]


def broken() -> dict[str, str]:
    """Entry points of group `luminagrid.ops` that were not registered, and why."""
    return dict(_BROKEN)


def canonical(package: str) -> str:
    """A distribution name as pip compares them: "Foo_Ops" and "foo-ops" are one package."""
    return re.sub(r"[-_.]+", "-", package).lower()


def _is_halo(halo: object) -> bool:
    """A whole number of rows (an int, not a bool or float) from 0 to `MAX_HALO_ROWS`."""
    return type(halo) is int and 0 <= halo <= MAX_HALO_ROWS  # noqa: E721 - exactly an int


def check_halo(op: Operation, values: Values) -> int:
    """`op.halo_rows(values)`, checked: a whole number of rows from 0 to `MAX_HALO_ROWS`, else
    `OperationUnavailable` (the operation is broken at these values, not the user's input)."""
    halo = op.halo_rows(values)
    if not _is_halo(halo):
        raise OperationUnavailable(
            f"operation {op.name} ({origin(op.name)}) declares a halo of {halo!r} rows at {values}; a halo must be a "
            f"whole number of rows from 0 to {MAX_HALO_ROWS}: fix its halo_rows()")
    return halo


_load_plugins()
