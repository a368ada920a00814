"""What strips cost: CPU seconds per megapixel of each operation class, as this cluster's strips finish.

Every strip task records, as it finishes, the CPU its pool process spent on it (decode, compute,
pack) per megapixel of the strip it computed (halo rows included). The supervisor reads the most
recent `HISTORY` figures of a class to judge a running strip (`speculation.py`): how much CPU it
should take, so that a process which burns many times that is stuck in a loop, and one whose
progress rate says it will finish long after a copy would, is a straggler.

A class is one operation at one package version, codec, channel count and parameter set
(`class_of`): a denoise with 35-pixel search windows costs many times the defaults' and is
judged only against its own kind. A class with no history (a fresh Redis, a new plugin, new
parameters) has no expected cost: only stalls are judged then, until its first strip finishes.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from dataclasses import dataclass

import redis

from luminagrid.messages import JobSpec
from luminagrid.settings import COST_KEY

#: Figures kept per class (the most recent).
HISTORY = 32
#: A class unused this long is forgotten, in seconds.
TTL_S = 7 * 86_400


def class_of(spec: JobSpec) -> str:
    """The cost class of a job's strips: "<op>:<digest of package, version, codec, channels, params>"."""
    params = json.dumps(spec.params, sort_keys=True)
    what = f"{spec.package}|{spec.version}|{spec.op}|{spec.codec.value}|{spec.channels}|{params}"
    return f"{spec.op}:{hashlib.sha1(what.encode()).hexdigest()[:16]}"


def megapixels(rows: int, width: int) -> float:
    """A strip's size in megapixels (rows including its halos)."""
    return rows * width / 1e6


@dataclass(frozen=True)
class Cost:
    """A class's recent CPU cost, in CPU seconds per megapixel."""

    median_s_per_mp: float
    max_s_per_mp: float
    #: how many finished strips it rests on
    samples: int


def record(pipe: redis.client.Pipeline, cls: str, cpu_s: float, mp: float) -> None:
    """Add one finished strip's CPU seconds for `mp` megapixels to its class's history (in `pipe`,
    which the caller executes: it shares the strip's round trip)."""
    if mp <= 0:
        return
    key = COST_KEY.format(cls=cls)
    pipe.lpush(key, f"{cpu_s / mp:.6g}")
    pipe.ltrim(key, 0, HISTORY - 1)
    pipe.expire(key, TTL_S)


def read(db: redis.Redis, classes: list[str]) -> dict[str, Cost]:
    """The recent cost of each class that has any history (one round trip)."""
    if not classes:
        return {}
    with db.pipeline(transaction=False) as pipe:
        for cls in classes:
            pipe.lrange(COST_KEY.format(cls=cls), 0, HISTORY - 1)
        replies = pipe.execute()
    out = {}
    for cls, raw in zip(classes, replies):
        values = []
        for item in raw:
            try:
                values.append(float(item))
            except ValueError:
                continue
        if values:
            out[cls] = Cost(statistics.median(values), max(values), len(values))
    return out
