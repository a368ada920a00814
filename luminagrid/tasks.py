"""Celery tasks: thin wrappers that decode, call the pure core, and encode.

Messages are plain dicts and bytes (msgpack), never pickles:
- `job`: {"id", "width", "height", "strips", "codec", "quality", "low", "high"}
- `strip`: {"index", "row0", "row1", "top", "bottom"} (see `strips.Strip`)
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import numpy as np
from celery import Task

from luminagrid import canny, codec
from luminagrid.app import app
from luminagrid.strips import Strip


def _worker_name(task: Task) -> str:
    return f"{task.request.hostname or 'local'}[{os.getpid()}]"


@app.task(name="luminagrid.canny_strip", bind=True)
def canny_strip(self: Task, job: dict[str, Any], strip: dict[str, Any], payload: bytes) -> dict[str, Any]:
    """Decode one strip, run the strip half of exact Canny, return packed bit maps."""
    s = Strip(**strip)
    width = int(job["width"])
    gray = codec.decode_strip(payload, codec.Codec(job["codec"]), s.bottom - s.top, width)
    result = canny.canny_strip(
        gray, s.halo_top, s.halo_bottom, float(job["low"]), float(job["high"]),
        seam_above=s.row0 > 0, seam_below=s.row1 < int(job["height"]),
    )
    return {
        "index": s.index,
        "row0": s.row0,
        "row1": s.row1,
        "edges": codec.pack_bits(result.edges),
        # Most strips have nothing pending: send None rather than a packed empty map.
        "pending": codec.pack_bits(result.pending) if result.pending.any() else None,
        "worker": _worker_name(self),
    }


@app.task(name="luminagrid.stitch", bind=True)
def stitch(self: Task, parts: list[dict[str, Any]], job: dict[str, Any]) -> dict[str, Any]:
    """Chord callback: stack the strips, finish hysteresis across seams, return the packed map."""
    height, width = int(job["height"]), int(job["width"])
    parts = sorted(parts, key=lambda p: p["index"])
    if [p["index"] for p in parts] != list(range(int(job["strips"]))):
        raise ValueError(f"job {job['id']}: got strips {[p['index'] for p in parts]}, expected {job['strips']}")
    edges = np.zeros((height, width), bool)
    pending = np.zeros((height, width), bool)
    for p in parts:
        rows = p["row1"] - p["row0"]
        edges[p["row0"]:p["row1"]] = codec.unpack_bits(p["edges"], rows, width)
        if p["pending"] is not None:
            pending[p["row0"]:p["row1"]] = codec.unpack_bits(p["pending"], rows, width)
    canny.finish_seams(edges, pending, [p["row0"] for p in parts[1:]])
    return {
        "width": width,
        "height": height,
        "edges": codec.pack_bits(edges),
        "workers": dict(Counter(p["worker"] for p in parts)),
        "stitched_by": _worker_name(self),
    }
