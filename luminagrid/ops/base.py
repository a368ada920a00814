"""What an operation is: its parameters, its halo, and how its strips become one image.

An operation is a small object (a module under `luminagrid/ops/`, or in an installed package that
registers it under the entry-point group `luminagrid.ops`: see `luminagrid.ops`) that says:
- `params`: typed, bounded parameters (`Param`), filled with defaults and validated by `values`;
- `halo_rows(values)`: the rows beyond its own that a strip needs for an exact result;
- `colour`: whether it computes on BGR when the input has colour (else on 8-bit gray);
- `bilevel`: whether its output pixels are only 0 and 255 (then 1-bit formats hold it exactly);
- `stitch_fields`: the fields of strip results the stitch reads (Canny's seam pass needs its
  pending pixels and the rows beside each seam); any other claimed field it only checks.

The default strip path suits any *local* operation, whose output pixel depends only on input
pixels within `halo_rows` of it: run `apply` on the strip plus its halo, crop the halo, ship the
rows losslessly; the stitch checks that the strips tile the image and the client writes their rows
into one array. Then the output equals `apply` on the whole image,
provided `apply` treats the image's own top and bottom edge the same way wherever it is called
(OpenCV's border modes do). Operations with a global pass override `compute`, `pack`, `stitch`
and `collect`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from luminagrid import codec, images
from luminagrid.codec import Codec
from luminagrid.errors import InputError
from luminagrid.strips import Strip

Value = float | int | str
Values = dict[str, Value]
#: Longest text a choice parameter's value may be (they travel in every strip message).
MAX_CHOICE_CHARS = 32


@dataclass(frozen=True)
class Param:
    """One parameter: `kind` int or float with inclusive bounds (optionally odd-only), or `str`
    with a fixed set of `choices` (make those with `Param.choice`)."""

    name: str
    kind: type
    default: Value
    lo: float
    hi: float
    help: str
    odd: bool = False
    choices: tuple[str, ...] = ()

    @classmethod
    def choice(cls, name: str, choices: tuple[str, ...], default: str, help: str) -> Param:
        """A parameter that is one of a few words, e.g. `Param.choice("mode", ("open", "close"), "open", ...)`."""
        return cls(name, str, default, 0, len(choices) - 1, help, choices=choices)

    @property
    def ends(self) -> tuple[Value, ...]:
        """The values at the ends of its range (every choice of a choice parameter), in order."""
        if self.kind is str:
            return self.choices
        if self.kind is int:
            lo, hi = math.ceil(self.lo), math.floor(self.hi)
            if self.odd:
                lo, hi = lo + (lo % 2 == 0), hi - (hi % 2 == 0)
            return (lo,) if lo == hi else (lo, hi)
        return (float(self.lo),) if self.lo == self.hi else (float(self.lo), float(self.hi))

    @property
    def range_text(self) -> str:
        """"1-31 (odd integer)", "0.1-50 (number)", "open|close|gradient"."""
        if self.kind is str:
            return "|".join(self.choices)
        kind = "odd integer" if self.odd else "integer" if self.kind is int else "number"
        return f"{self.lo:g}-{self.hi:g} ({kind})"

    @property
    def default_text(self) -> str:
        return str(self.default) if self.kind is str else f"{self.default:g}"

    def parse(self, raw: Any, op: str) -> Value:
        """A value from `-p name=value` text or a message field; raise `InputError` if unusable."""
        if self.kind is str:
            fix = f"use one of {', '.join(self.choices)} (default {self.default})"
            if not isinstance(raw, str) or raw.strip() not in self.choices:
                raise InputError(f"--op {op}: parameter {self.name}={raw!r} is not one of its choices; {fix}.")
            return raw.strip()
        noun = "a whole number" if self.kind is int else "a number"
        fix = f"use {'an odd whole number' if self.odd else noun} from {self.lo:g} to {self.hi:g} (default {self.default:g})"
        where = f"--op {op}: parameter {self.name}"
        value: float | int
        try:
            if isinstance(raw, bool):
                raise ValueError
            if self.kind is int:
                value = int(raw) if isinstance(raw, int) else int(str(raw).strip(), 10)
            else:
                value = float(raw)
        except (TypeError, ValueError, OverflowError):
            raise InputError(f"{where}={raw!r} is not {noun}; {fix}.") from None
        if not (math.isfinite(value) and self.lo <= value <= self.hi) or (self.odd and value % 2 == 0):
            raise InputError(f"{where}={raw!r} is out of range; {fix}.")
        return value


class Operation:
    """Base class of every operation; subclasses set the class attributes and `apply`."""

    name: ClassVar[str]
    #: one line for `--help` and the README
    summary: ClassVar[str]
    params: ClassVar[tuple[Param, ...]] = ()
    colour: ClassVar[bool] = True
    #: its output pixels are only 0 and 255 (a 1-bit `.pbm` holds it exactly)
    bilevel: ClassVar[bool] = False
    #: fields of strip results the stitch fetches; the rest it only checks are there (claims)
    stitch_fields: ClassVar[tuple[str, ...]] = ()
    #: output file name: `<stem>.<suffix>.png` (default: the operation's name)
    suffix: ClassVar[str] = ""
    #: pixels per strip when the user does not choose a count (halo work vs load balance)
    strip_pixels: ClassVar[int] = 2_000_000
    #: images of at most this many pixels run as one strip by default: where the operation is so
    #: cheap that a second strip's messages cost more than sharing the work saves (0: never)
    one_strip_pixels: ClassVar[int] = 0
    #: the byte fields of what `pack` and `stitch` return (large ones travel as claim checks)
    fields: ClassVar[tuple[str, ...]] = ("pixels",)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("suffix") and isinstance(cls.__dict__.get("name"), str):
            cls.suffix = cls.__dict__["name"]

    # --- parameters -------------------------------------------------------------------------------

    def values(self, given: Mapping[str, Any]) -> Values:
        """All parameters, defaults filled in, each validated; raise `InputError` naming the bad one."""
        known = {p.name: p for p in self.params}
        unknown = sorted((str(k) for k in set(given) - set(known)), key=repr)
        if unknown:
            names = ", ".join(known) or "none"
            raise InputError(f"--op {self.name} has no parameter {unknown[0]!r}; its parameters are: {names}.")
        values = {name: p.parse(given[name], self.name) if name in given else p.default for name, p in known.items()}
        self.check(values)
        return values

    def check(self, values: Values) -> None:
        """Checks across parameters (raise `InputError`); none by default."""

    def halo_rows(self, values: Values) -> int:
        """Rows above and below a strip that its exact result depends on: the farthest row, up or
        down, that an output pixel's value can depend on. `cli.py check-op` checks it."""
        raise NotImplementedError

    # --- the pure core ----------------------------------------------------------------------------

    def output_channels(self, channels: int) -> int:
        """Channels of the output for an input of `channels` (1 gray, 3 colour)."""
        return channels if self.colour else 1

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """The 8-bit array this operation computes on: (H, W) gray, or (H, W, 3) BGR if `colour`."""
        return images.to_bgr8(image) if self.colour else images.to_gray8(image)

    def apply(self, pixels: np.ndarray, values: Values) -> np.ndarray:
        """The operation on a whole image (the single-machine answer), same shape and dtype."""
        raise NotImplementedError

    def compute(self, pixels: np.ndarray, strip: Strip, height: int, values: Values) -> Any:
        """A strip's share of the output, from its pixels plus halo: rows `row0:row1`."""
        return self.apply(pixels, values)[strip.halo_top : pixels.shape[0] - strip.halo_bottom]

    def pack(self, result: Any) -> dict[str, Any]:
        """What a strip task returns (bytes and plain values only: it travels as msgpack)."""
        return {"pixels": codec.encode_strip(result, Codec.lossless, 0)}

    def stitch(self, parts: list[dict[str, Any]], width: int, channels: int) -> dict[str, Any]:
        """The chord callback's work on strip results that tile the image, top to bottom.

        A local operation has nothing left to compute: the strips' outputs are handed on in order
        (bytes or claim checks, not decoded here) and `collect` writes them into one image.
        Raises `codec.CodecError` on a corrupt part.
        """
        return {"pixels": [p["pixels"] for p in parts], "rows": [p["row1"] - p["row0"] for p in parts]}

    def collect(self, stitched: dict[str, Any], height: int, width: int, channels: int) -> np.ndarray:
        """The output image from the stitch task's result: (H, W) or (H, W, 3) uint8."""
        rows = [int(r) for r in stitched["rows"]]
        if sum(rows) != height or len(rows) != len(stitched["pixels"]):
            raise codec.CodecError(f"strip outputs of {rows} rows do not make {height} rows")
        image = np.empty(codec.shape_of(height, width, channels), np.uint8)
        top = 0
        for data, count in zip(stitched["pixels"], rows):
            image[top : top + count] = codec.decode_strip(data, Codec.lossless, count, width, channels)
            top += count
        return image
