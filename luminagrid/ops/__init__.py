"""The operations luminagrid can distribute, by name. Adding one: a module here, a line below."""

from __future__ import annotations

from luminagrid.errors import InputError
from luminagrid.ops import bilateral, canny, denoise, gaussian
from luminagrid.ops.base import Operation, Param, Values
from luminagrid.settings import DEFAULT_OP

REGISTRY: dict[str, Operation] = {m.OP.name: m.OP for m in (canny, gaussian, bilateral, denoise)}
DEFAULT = DEFAULT_OP

__all__ = ["DEFAULT", "REGISTRY", "Operation", "Param", "Values", "get"]


def get(name: str) -> Operation:
    """The operation called `name`, or `InputError` listing the known ones."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise InputError(f"unknown operation --op {name!r}; choose one of: {', '.join(REGISTRY)}.") from None
