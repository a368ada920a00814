"""Claim checks: large byte strings wait in Redis under a key; task messages carry only the key.

Celery's Redis transport wraps every message body in base64 inside JSON, at 12-28 ms per MB on
each side; a plain Redis SET + GET of the same bytes costs ~3-5 ms per MB (FIELD-NOTES section 2).
So strip payloads and strip outputs above `LUMINAGRID_INLINE_MAX_BYTES` (16 KiB) travel as claims:
`{"claim": key}`.

Keys are fixed by job id, direction and strip index (`key_for`), so a redelivered or republished
task finds the same bytes and writes the same bytes; they expire with the job's results
(`LUMINAGRID_RESULT_TTL_S`) and `Job.forget` deletes them. A worker reads only the key its
message is entitled to, fetches at most its size limit + 1 byte, and fails the strip with a clear
message when the key has expired.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from luminagrid.app import app
from luminagrid.errors import ClaimGone, MessageError
from luminagrid.settings import KEY_PREFIX, Settings


def key_for(job_id: str, direction: str, index: int, field: str = "payload") -> str:
    """The key of strip `index`'s payload (`direction` "in") or of one field of its output ("out";
    index = strip count for the stitched output) in job `job_id`."""
    return f"{KEY_PREFIX}{direction}:{job_id}:{index}:{field}"


def keys_of(job_id: str, strips: int, fields: Iterable[str]) -> list[str]:
    """Every claim key a job can have, given its operation's output fields (for deletion)."""
    fields = list(fields)
    return [key_for(job_id, "in", i) for i in range(strips)] + [
        key_for(job_id, "out", i, f) for i in range(strips + 1) for f in fields
    ]


def is_claim(value: Any) -> bool:
    return isinstance(value, dict) and "claim" in value


#: What a job's strip results may carry inline, in all, beside what the seam pass reads: the
#: chord join and the stitch hold every strip's result at once (1000 strips of 100 KB inline
#: edges made both pool processes of a gigapixel job peak 400 MB above their idle size).
JOB_INLINE_BYTES = 4 * 1024 * 1024


def inline_limit(settings: Settings, strips: int) -> int:
    """Largest byte field a strip's result of a `strips`-strip job carries inline."""
    return min(settings.inline_max_bytes, JOB_INLINE_BYTES // max(1, strips))


def offload_many(items: Iterable[tuple[bytes, str, int]], settings: Settings) -> list[bytes | dict[str, str]]:
    """Each byte string itself if at most its limit, else stored under its key (one round trip
    for all) and replaced by a claim. Items are (bytes, key, limit in bytes)."""
    out: list[bytes | dict[str, str]] = []
    with app.backend.client.pipeline(transaction=False) as pipe:
        for data, key, limit in items:
            if len(data) <= limit:
                out.append(data)
            else:
                pipe.set(key, data, ex=settings.result_ttl_s)
                out.append({"claim": key})
        pipe.execute()
    return out


def offload_fields(fields: dict[str, Any], key_of: Callable[[str], str], settings: Settings,
                   limit_of: Callable[[str], int] | None = None) -> dict[str, Any]:
    """A task result with its large byte fields stored as claims (`key_of(field)` names the key;
    `limit_of(field)` the largest inline size, else `settings.inline_max_bytes`)."""
    names = [k for k, v in fields.items() if isinstance(v, bytes)]
    limit = limit_of or (lambda _field: settings.inline_max_bytes)
    stored = offload_many(((fields[k], key_of(k), limit(k)) for k in names), settings)
    return {**fields, **dict(zip(names, stored))}


def _claimed_key(value: Any, key: str, what: str) -> str:
    """`key`, if `value` is a well-formed claim on exactly it; else raise `MessageError`."""
    if not (isinstance(value, dict) and set(value) == {"claim"}):
        raise MessageError(f"{what}: payload is {type(value).__name__}, not bytes or a claim")
    if value["claim"] != key:
        raise MessageError(f"{what}: claim {value['claim']!r} is not this strip's key {key!r}")
    return key


def _gone(key: str, what: str) -> ClaimGone:
    return ClaimGone(
        f"{what}: its bytes under {key} are gone (expired after LUMINAGRID_RESULT_TTL_S, or deleted); "
        "submit the image again", key,
    )


def check(value: Any, key: str, limit: int, what: str) -> None:
    """That a claim names `key`, which still holds 1 to `limit` bytes (without fetching them)."""
    size = app.backend.client.strlen(_claimed_key(value, key, what))
    if not size:
        raise _gone(key, what)
    if size > limit:
        raise MessageError(f"{what}: {size} bytes under {key} exceed {limit}")


def redeem(value: Any, key: str, limit: int, what: str) -> bytes:
    """The bytes behind `value` (inline bytes, or a claim that must name exactly `key`).

    Raises `MessageError` for anything else, a claim on another key, a value over `limit`
    bytes, or an expired key. At most `limit` + 1 bytes are fetched, in one round trip.
    """
    if isinstance(value, bytes):
        data = value
    else:
        data = app.backend.client.getrange(_claimed_key(value, key, what), 0, limit)
        if not data:  # a claim is never empty: only byte strings above the inline size are stored
            raise _gone(key, what)
    if len(data) > limit:
        raise MessageError(f"{what}: payload of {len(data)} bytes exceeds {limit}")
    return data


def redeem_fields(
    fields: dict[str, Any], key_of: Callable[[str, int | None], str], limit: int, what: str
) -> dict[str, Any]:
    """A result with its claims replaced by their bytes. A list field holds one value per strip:
    its items are keyed `key_of(field, index)`, single values `key_of(field, None)`."""
    def one(value: Any, key: str) -> Any:
        return redeem(value, key, limit, what) if is_claim(value) else value

    return {
        k: [one(item, key_of(k, i)) for i, item in enumerate(v)] if isinstance(v, list) else one(v, key_of(k, None))
        for k, v in fields.items()
    }
