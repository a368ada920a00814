"""Claim checks: large byte strings wait in Redis under a key; task messages carry only the key.

Celery's Redis transport wraps every message body in base64 inside JSON, at 12-28 ms per MB on
each side; a plain Redis SET + GET of the same bytes costs ~3-5 ms per MB (FIELD-NOTES section 2).
So strip payloads and strip outputs above `LUMINAGRID_INLINE_MAX_BYTES` (256 KiB) travel as claims:
`{"claim": key}`.

Keys are fixed by job id, direction and strip index (`key_for`), so a redelivered or republished
task finds the same bytes and writes the same bytes; they expire with the job's results
(`LUMINAGRID_RESULT_TTL_S`) and `Job.forget` deletes them. A worker reads only the key its
message is entitled to, checks its size before fetching it, and fails the strip with a clear
message when the key has expired.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from luminagrid.app import app
from luminagrid.errors import MessageError
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


def offload(data: bytes, key: str, settings: Settings) -> bytes | dict[str, str]:
    """`data` itself if small, else stored under `key` and replaced by a claim."""
    if len(data) <= settings.inline_max_bytes:
        return data
    app.backend.client.set(key, data, ex=settings.result_ttl_s)
    return {"claim": key}


def offload_many(items: Iterable[tuple[bytes, str]], settings: Settings) -> list[bytes | dict[str, str]]:
    """`offload` for many byte strings, stored in one round trip."""
    out: list[bytes | dict[str, str]] = []
    with app.backend.client.pipeline(transaction=False) as pipe:
        for data, key in items:
            if len(data) <= settings.inline_max_bytes:
                out.append(data)
            else:
                pipe.set(key, data, ex=settings.result_ttl_s)
                out.append({"claim": key})
        pipe.execute()
    return out


def redeem(value: Any, key: str, limit: int, what: str) -> bytes:
    """The bytes behind `value` (inline bytes, or a claim that must name exactly `key`).

    Raises `MessageError` for anything else, a claim on another key, a value over `limit`
    bytes, or an expired key.
    """
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, dict) and set(value) == {"claim"}:
        if value["claim"] != key:
            raise MessageError(f"{what}: claim {value['claim']!r} is not this strip's key {key!r}")
        client = app.backend.client
        size = client.strlen(key)
        if size > limit:
            raise MessageError(f"{what}: {size} bytes under {key} exceed {limit}")
        data = client.get(key)
        if data is None:
            raise MessageError(
                f"{what}: its bytes under {key} are gone (expired after LUMINAGRID_RESULT_TTL_S, "
                "or deleted); submit the image again"
            )
    else:
        raise MessageError(f"{what}: payload is {type(value).__name__}, not bytes or a claim")
    if len(data) > limit:
        raise MessageError(f"{what}: payload of {len(data)} bytes exceeds {limit}")
    return data
