"""The strip message: built by the submitter, validated by the worker before any decoding.

A strip task gets three arguments (msgpack, never pickle):
- `job`: {"id", "width", "height", "strips", "codec", "quality", "low", "high"}
- `strip`: {"index", "row0", "row1", "top", "bottom"} (see `strips.Strip`)
- `payload`: the strip's encoded pixels (`codec.encode_strip`)

Anything can be published onto a Redis queue, so a worker trusts none of it: `validate` checks
types, ranges and sizes before a byte is decoded, and raises `MessageError` naming the problem.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from luminagrid import canny, strips
from luminagrid.codec import Codec
from luminagrid.errors import MessageError

#: A job id is a UUID (36 characters); anything much longer is not ours.
MAX_ID_CHARS = 64
#: Encoded strips are at most this much larger than their raw pixels (JPEG at q100 can be).
PAYLOAD_SLACK_BYTES = 64 * 1024


@dataclass(frozen=True)
class JobSpec:
    """What every strip task and the stitch task of one job need to know."""

    id: str
    width: int
    height: int
    strips: int
    codec: Codec
    quality: int
    low: float
    high: float

    def to_message(self) -> dict[str, Any]:
        return {
            "id": self.id, "width": self.width, "height": self.height, "strips": self.strips,
            "codec": self.codec.value, "quality": self.quality, "low": self.low, "high": self.high,
        }


def strip_message(s: strips.Strip) -> dict[str, int]:
    return {"index": s.index, "row0": s.row0, "row1": s.row1, "top": s.top, "bottom": s.bottom}


def _int(d: dict[str, Any], key: str, lo: int, hi: int) -> int:
    value = d.get(key)
    if type(value) is not int or not lo <= value <= hi:  # noqa: E721 - bool is not an int here
        raise MessageError(f"field {key!r} = {value!r} is not a whole number in [{lo}, {hi}]")
    return value


def _float(d: dict[str, Any], key: str, lo: float, hi: float) -> float:
    value = d.get(key)
    if type(value) not in (int, float) or not (math.isfinite(value) and lo <= value <= hi):
        raise MessageError(f"field {key!r} = {value!r} is not a number in [{lo:g}, {hi:g}]")
    return float(value)


def parse_job(job: Any, max_pixels: int) -> JobSpec:
    if not isinstance(job, dict):
        raise MessageError(f"job must be a mapping, got {type(job).__name__}")
    job_id = job.get("id")
    if not isinstance(job_id, str) or not 0 < len(job_id) <= MAX_ID_CHARS:
        raise MessageError(f"job id {job_id!r} is not a string of 1-{MAX_ID_CHARS} characters")
    width = _int(job, "width", 1, max_pixels)
    height = _int(job, "height", 1, max_pixels)
    if width * height > max_pixels:
        raise MessageError(f"job {job_id}: {width}x{height} exceeds the pixel limit {max_pixels}")
    try:
        kind = Codec(job.get("codec"))
    except ValueError:
        raise MessageError(f"job {job_id}: unknown codec {job.get('codec')!r}") from None
    low = _float(job, "low", 0, canny.MAX_THRESHOLD)
    high = _float(job, "high", low, canny.MAX_THRESHOLD)
    return JobSpec(
        id=job_id, width=width, height=height, strips=_int(job, "strips", 1, strips.MAX_STRIPS),
        codec=kind, quality=_int(job, "quality", 0, 100), low=low, high=high,
    )


def parse_strip(strip: Any, job: JobSpec, halo_rows: int) -> strips.Strip:
    if not isinstance(strip, dict):
        raise MessageError(f"strip must be a mapping, got {type(strip).__name__}")
    s = strips.Strip(
        index=_int(strip, "index", 0, job.strips - 1),
        row0=_int(strip, "row0", 0, job.height - 1),
        row1=_int(strip, "row1", 1, job.height),
        top=_int(strip, "top", 0, job.height - 1),
        bottom=_int(strip, "bottom", 1, job.height),
    )
    if not (s.top <= s.row0 < s.row1 <= s.bottom) or s.halo_top > halo_rows or s.halo_bottom > halo_rows:
        raise MessageError(f"job {job.id}: strip rows {strip} are inconsistent (halo at most {halo_rows})")
    return s


def check_payload(payload: Any, s: strips.Strip, job: JobSpec) -> bytes:
    if not isinstance(payload, bytes):
        raise MessageError(f"job {job.id} strip {s.index}: payload is {type(payload).__name__}, not bytes")
    limit = (s.bottom - s.top) * job.width + PAYLOAD_SLACK_BYTES
    if len(payload) > limit:
        raise MessageError(
            f"job {job.id} strip {s.index}: payload of {len(payload)} bytes exceeds {limit} "
            f"for {s.bottom - s.top}x{job.width} pixels"
        )
    return payload
