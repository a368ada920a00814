"""The strip message: built by the submitter, validated by the worker before any decoding.

A strip task gets three arguments (msgpack, never pickle):
- `job`: {"id", "op", "params", "width", "height", "channels", "strips", "codec", "quality", "file",
  "package", "version", "halo_rows", "fields"} (`JobSpec`)
- `strip`: {"index", "row0", "row1", "top", "bottom"} (see `strips.Strip`)
- `payload`: the strip's encoded pixels (`codec.encode_strip`), inline or as a claim (`claims`);
  in a `file` job (one strip: a small image) the input file itself, which the worker decodes

Anything can be published onto a Redis queue, so a worker trusts none of it: `parse_job`,
`parse_strip` and `check_payload` check types, ranges and sizes before a byte is decoded, and raise
`MessageError` naming the problem. `resolve` then checks that the worker's operation is the
submitter's: same package, same version, same halo (`OperationUnavailable` if not).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from luminagrid import claims, ops, source, strips
from luminagrid.codec import Codec
from luminagrid.errors import InputError, MessageError, OperationUnavailable

#: A job id is a UUID (36 characters); anything much longer is not ours.
MAX_ID_CHARS = 64
#: Encoded strips are at most this much larger than their raw pixels (JPEG at q100 can be).
PAYLOAD_SLACK_BYTES = 64 * 1024
#: Longest word a job message carries: parameter and package names, versions, fields.
MAX_NAME_CHARS = 100


@dataclass(frozen=True)
class JobSpec:
    """What every strip task and the stitch task of one job need to know."""

    id: str
    op: str
    #: every parameter of the operation, validated (`Operation.values`)
    params: dict[str, ops.Value]
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
    #: the package and version of the submitter's operation: a worker with other code refuses it
    package: str = ops.BUILT_IN.package
    version: str = ops.BUILT_IN.version
    #: the aligned halo the strips were cut with (`strips.halo_for` of the operation's need)
    halo_rows: int = 0
    #: the byte fields of the operation's results (`Operation.fields`): their claim keys
    fields: tuple[str, ...] = ("pixels",)

    @classmethod
    def create(cls, op: ops.Operation, values: ops.Values, **fields: Any) -> JobSpec:
        """A new job's spec for operation `op` at validated `values`: its origin and halo filled in."""
        where = ops.origin(op.name)
        return cls(op=op.name, params=dict(values), package=where.package, version=where.version,
                   halo_rows=strips.halo_for(ops.check_halo(op, values)), fields=tuple(op.fields), **fields)

    @functools.cached_property
    def operation(self) -> ops.Operation:
        """This node's operation for the job; `OperationUnavailable` if it lacks it or has other code."""
        return resolve(self)

    def to_message(self) -> dict[str, Any]:
        return {
            "id": self.id, "op": self.op, "params": dict(self.params), "width": self.width,
            "height": self.height, "channels": self.channels, "strips": self.strips,
            "codec": self.codec.value, "quality": self.quality, "file": self.file,
            "package": self.package, "version": self.version, "halo_rows": self.halo_rows, "fields": list(self.fields),
        }


def resolve(spec: JobSpec, where: str = "this node") -> ops.Operation:
    """The operation `spec` names, checked to be the submitter's: same package, same version,
    the same halo and fields at these parameters. Raise `OperationUnavailable` naming the
    package and both versions (exactness needs the same code on every node), or `MessageError`
    if the parameters are not the operation's own validated values."""
    wanted = f"{spec.package} {spec.version}"
    try:
        op = ops.get(spec.op)
    except InputError:
        if ops.canonical(spec.package) == ops.canonical(ops.BUILT_IN.package):
            raise OperationUnavailable(
                f"{where} has no operation {spec.op!r}, which the submitter's luminagrid {spec.version} has built in; "
                f"this node runs luminagrid {ops.BUILT_IN.version}: run the same luminagrid on every node") from None
        raise OperationUnavailable(
            f"{where} has no operation {spec.op!r}: the job was submitted with it from package {wanted}; install "
            f"that package on every worker (pip install '{spec.package}=={spec.version}') and restart them") from None
    except OperationUnavailable as exc:  # installed, but it failed to load here
        raise OperationUnavailable(f"{where}: {exc}") from None
    here = ops.origin(op.name)
    if (ops.canonical(here.package), here.version) != (ops.canonical(spec.package), spec.version):
        what = "version" if ops.canonical(here.package) == ops.canonical(spec.package) else "package and version"
        raise OperationUnavailable(
            f"{where} has operation {spec.op!r} from {here}, but the job was submitted with {wanted}; every node "
            f"must run the same {what} (the output is exact only then): install {spec.package}=={spec.version} "
            "on every node, or the same newer version everywhere")
    try:
        values = op.values(spec.params)
    except InputError as exc:
        raise MessageError(f"job {spec.id}: {exc}") from None
    if values != spec.params or any(type(v) is not type(spec.params[k]) for k, v in values.items()):
        raise MessageError(f"job {spec.id}: params {spec.params} are not every parameter of {op.name}, each of its type "
                           f"(expected {values})")
    if spec.channels == 3 and not op.colour:
        raise MessageError(f"job {spec.id}: {spec.channels} channels do not suit operation {op.name}")
    halo_rows = strips.halo_for(ops.check_halo(op, values))
    if (halo_rows, tuple(op.fields)) != (spec.halo_rows, spec.fields):
        raise OperationUnavailable(
            f"{where}'s operation {spec.op!r} ({here}) asks for a halo of {halo_rows} rows and fields {list(op.fields)}, "
            f"but the job was cut with {spec.halo_rows} rows and fields {list(spec.fields)}: the nodes run different code "
            f"under the same version; install the same build of {spec.package} on every node")
    return op


def strip_message(s: strips.Strip) -> dict[str, int]:
    return {"index": s.index, "row0": s.row0, "row1": s.row1, "top": s.top, "bottom": s.bottom}


def _int(d: dict[str, Any], key: str, lo: int, hi: int) -> int:
    value = d.get(key)
    if type(value) is not int or not lo <= value <= hi:  # noqa: E721 - bool is not an int here
        raise MessageError(f"field {key!r} = {value!r} is not a whole number in [{lo}, {hi}]")
    return value


def parse_job(job: Any, max_pixels: int, where: str | None = "this node") -> JobSpec:
    """A job message's spec, every field checked; `MessageError` naming a bad one. Unless `where`
    is None, also resolve its operation (`resolve`, whose errors name `where`) once, for
    `JobSpec.operation`. A supervisor reads records of jobs whose operation its node may lack,
    and needs none of it: it passes None."""
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
    if not isinstance(params, dict) or len(params) > ops.MAX_PARAMS or not all(
        isinstance(k, str) and len(k) <= MAX_NAME_CHARS and (type(v) in (int, float) or (
            isinstance(v, str) and len(v) <= ops.base.MAX_CHOICE_CHARS)) for k, v in params.items()):
        raise MessageError(f"job {job_id}: params {params!r} is not a mapping of names to numbers or short words")
    op = job.get("op")
    if not isinstance(op, str) or not ops.NAME.fullmatch(op):
        raise MessageError(f"job {job_id}: operation {op!r} is not an operation's name")
    package, version, fields = job.get("package"), job.get("version"), job.get("fields")
    if not (isinstance(package, str) and 0 < len(package) <= MAX_NAME_CHARS and isinstance(version, str)
            and 0 < len(version) <= MAX_NAME_CHARS):
        raise MessageError(f"job {job_id}: package {package!r} version {version!r} are not a package's name and version")
    if not isinstance(fields, list) or not 0 < len(fields) <= ops.MAX_FIELDS or not all(
            isinstance(f, str) and 0 < len(f) <= MAX_NAME_CHARS for f in fields):
        raise MessageError(f"job {job_id}: fields {fields!r} is not a list of 1-{ops.MAX_FIELDS} field names")
    halo_rows = _int(job, "halo_rows", 0, strips.halo_for(ops.MAX_HALO_ROWS))
    if halo_rows % strips.ALIGN_ROWS:
        raise MessageError(f"job {job_id}: halo_rows {halo_rows} is not a multiple of {strips.ALIGN_ROWS}")
    channels = _int(job, "channels", 1, 3)
    if channels == 2:
        raise MessageError(f"job {job_id}: 2 channels is neither gray (1) nor colour (3)")
    file = job.get("file", False)
    count = _int(job, "strips", 1, strips.MAX_STRIPS)
    if type(file) is not bool or (file and count != 1):  # noqa: E721 - exactly a bool
        raise MessageError(f"job {job_id}: field 'file' = {file!r} is not a bool (true only for 1 strip)")
    spec = JobSpec(
        id=job_id, op=op, params=dict(params), width=width, height=height, channels=channels,
        strips=count, codec=kind, quality=_int(job, "quality", 0, 100), file=file,
        package=package, version=version, halo_rows=halo_rows, fields=tuple(fields),
    )
    if where is not None:
        spec.__dict__["operation"] = resolve(spec, where)  # `operation`'s cache (a cached_property)
    return spec


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
