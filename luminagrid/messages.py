"""The strip message: built by the submitter, validated by the worker before any decoding.

A strip task gets three arguments (msgpack, never pickle):
- `job`: {"id", "op", "params", "width", "height", "channels", "strips", "codec", "quality", "file"}
- `strip`: {"index", "row0", "row1", "top", "bottom"} (see `strips.Strip`)
- `payload`: the strip's encoded pixels (`codec.encode_strip`), inline or as a claim (`claims`);
  in a `file` job (one strip: a small image) the input file itself, which the worker decodes

Anything can be published onto a Redis queue, so a worker trusts none of it: `parse_job`,
`parse_strip` and `check_payload` check types, ranges and sizes before a byte is decoded, and raise
`MessageError` naming the problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from luminagrid import claims, ops, source, strips
from luminagrid.codec import Codec
from luminagrid.errors import InputError, MessageError

#: A job id is a UUID (36 characters); anything much longer is not ours.
MAX_ID_CHARS = 64
#: Encoded strips are at most this much larger than their raw pixels (JPEG at q100 can be).
PAYLOAD_SLACK_BYTES = 64 * 1024


@dataclass(frozen=True)
class JobSpec:
    """What every strip task and the stitch task of one job need to know."""

    id: str
    op: str
    #: every parameter of the operation, validated (`Operation.values`)
    params: dict[str, float | int]
    width: int
    height: int
    #: 1 (gray) or 3 (BGR): of the strips going out and of the output image
    channels: int
    strips: int
    codec: Codec
    quality: int
    #: the one strip's payload is the input file (a small streamable PNG, JPEG or TIFF), which
    #: the worker decodes, converts and (in JPEG mode) round-trips as the submitter would have
    file: bool = False

    @property
    def operation(self) -> ops.Operation:
        return ops.get(self.op)

    @property
    def halo_rows(self) -> int:
        """The aligned halo this job's strips carry (`strips.halo_for` of the operation's need)."""
        return strips.halo_for(self.operation.halo_rows(self.params))

    def to_message(self) -> dict[str, Any]:
        return {
            "id": self.id, "op": self.op, "params": dict(self.params), "width": self.width,
            "height": self.height, "channels": self.channels, "strips": self.strips,
            "codec": self.codec.value, "quality": self.quality, "file": self.file,
        }


def strip_message(s: strips.Strip) -> dict[str, int]:
    return {"index": s.index, "row0": s.row0, "row1": s.row1, "top": s.top, "bottom": s.bottom}


def _int(d: dict[str, Any], key: str, lo: int, hi: int) -> int:
    value = d.get(key)
    if type(value) is not int or not lo <= value <= hi:  # noqa: E721 - bool is not an int here
        raise MessageError(f"field {key!r} = {value!r} is not a whole number in [{lo}, {hi}]")
    return value


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
    params = job.get("params")
    if not isinstance(params, dict) or not all(type(v) in (int, float) for v in params.values()):
        raise MessageError(f"job {job_id}: params {params!r} is not a mapping of names to numbers")
    try:
        # The same validation as the submitter's: names, types, ranges (so halos stay bounded).
        op = ops.get(job.get("op"))
        values = op.values(params)
    except InputError as exc:
        raise MessageError(f"job {job_id}: {exc}") from None
    if set(values) != set(params):
        raise MessageError(f"job {job_id}: params {sorted(params)} do not name every parameter of {op.name}")
    channels = _int(job, "channels", 1, 3)
    if channels == 2 or (channels == 3 and not op.colour):
        raise MessageError(f"job {job_id}: {channels} channels do not suit operation {op.name}")
    file = job.get("file", False)
    count = _int(job, "strips", 1, strips.MAX_STRIPS)
    if type(file) is not bool or (file and count != 1):  # noqa: E721 - exactly a bool
        raise MessageError(f"job {job_id}: field 'file' = {file!r} is not a bool (true only for 1 strip)")
    return JobSpec(
        id=job_id, op=op.name, params=values, width=width, height=height, channels=channels,
        strips=count, codec=kind, quality=_int(job, "quality", 0, 100), file=file,
    )


def parse_strip(strip: Any, job: JobSpec) -> strips.Strip:
    if not isinstance(strip, dict):
        raise MessageError(f"strip must be a mapping, got {type(strip).__name__}")
    s = strips.Strip(
        index=_int(strip, "index", 0, job.strips - 1),
        row0=_int(strip, "row0", 0, job.height - 1),
        row1=_int(strip, "row1", 1, job.height),
        top=_int(strip, "top", 0, job.height - 1),
        bottom=_int(strip, "bottom", 1, job.height),
    )
    halo_rows = job.halo_rows
    if not (s.top <= s.row0 < s.row1 <= s.bottom) or s.halo_top > halo_rows or s.halo_bottom > halo_rows:
        raise MessageError(f"job {job.id}: strip rows {strip} are inconsistent (halo at most {halo_rows})")
    return s


def result_limit(rows: int, job: JobSpec) -> int:
    """Most bytes any field of a result for `rows` rows can hold: Canny's pending pixels take
    8 bytes each (before LZ4), an image row `width * channels`."""
    return 8 * rows * job.width * job.channels + PAYLOAD_SLACK_BYTES


def payload_limit(s: strips.Strip, job: JobSpec) -> int:
    """Most bytes strip `s`'s encoded pixels can take (a `file` job's: its file's)."""
    if job.file:
        return source.file_limit(job.width, job.height)
    raw = (s.bottom - s.top) * job.width * job.channels
    # JPEG at quality 100 can be larger than the raw samples (measured: 1.3x on noise).
    return (2 * raw if job.codec is Codec.jpeg else raw) + PAYLOAD_SLACK_BYTES


def check_payload(payload: Any, s: strips.Strip, job: JobSpec) -> bytes:
    """The strip's encoded bytes: inline, or fetched from its claim key (`claims`), size-checked."""
    return claims.redeem(payload, claims.key_for(job.id, "in", s.index), payload_limit(s, job), f"job {job.id} strip {s.index}")
