"""What a job computes and how its strips travel: `Params`, checked before anything is read.

Light on purpose (no Celery, no Redis): the command line validates its options with it, and can
start reading the image, before the heavy imports that sending needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from luminagrid import ops, strips
from luminagrid.errors import InputError
from luminagrid.settings import Codec


@dataclass(frozen=True)
class Params:
    """What to compute and how to ship it. `validate()` raises `InputError` naming the bad value."""

    op: str = ops.DEFAULT
    #: the operation's parameters by name (text or numbers); `validate()` fills in the defaults
    values: Mapping[str, Any] = field(default_factory=dict)
    strips: int | None = None
    codec: Codec = Codec.jpeg
    quality: int = 95

    @property
    def operation(self) -> ops.Operation:
        return ops.get(self.op)

    def validate(self) -> Params:
        """A copy with every parameter of the operation present and checked."""
        values = self.operation.values(self.values)
        if self.strips is not None and not (1 <= self.strips <= strips.MAX_STRIPS):
            raise InputError(f"--strips {self.strips} is out of range; use 1 to {strips.MAX_STRIPS}.")
        if not (1 <= self.quality <= 100):
            raise InputError(f"--quality {self.quality} is out of range; use 1 to 100.")
        return replace(self, values=values, codec=Codec(self.codec))
