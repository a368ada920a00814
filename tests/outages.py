"""Redis outages for the crash tests: stopped cleanly, or crashed losing its last second of writes.

A clean stop (SIGTERM) makes Redis write its AOF and exit: nothing is lost. A crash of the
process alone (SIGKILL) loses nothing either, since Redis writes each command to the AOF before
replying (the OS keeps the file). What a crash of the *machine* loses, with `appendfsync
everysec`, is up to the last second of writes: `crash()` reproduces that by SIGKILLing Redis and
cutting its AOF back to the size it had `LOSE_S` earlier (the AOF only ever grows at its end,
so that is exactly "the last second of writes is gone").
"""

from __future__ import annotations

import collections
import os
import threading
import time

from luminagrid.local import LocalRedis

LOSE_S = 1.0
SAMPLE_S = 0.02
#: Redis options for a crash-testable server: AOF on, never rewritten behind the sampler's back.
REDIS_ARGS = ("--auto-aof-rewrite-percentage", "0")


class Outages:
    """Stop or crash one `LocalRedis` and start it again; samples its AOF size meanwhile."""

    def __init__(self, redis: LocalRedis) -> None:
        self.redis = redis
        self.samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=int(10 / SAMPLE_S))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @property
    def aof(self) -> str:
        return str(self.redis.folder / "appendonly.aof")

    def _size(self) -> int:
        try:
            return os.path.getsize(self.aof)
        except OSError:
            return 0

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.samples.append((time.monotonic(), self._size()))

    def down(self, how: str) -> None:
        """`stop` (SIGTERM) or `crash` (SIGKILL, then lose the last `LOSE_S` of writes)."""
        if how == "stop":
            self.redis.stop()
            return
        assert how == "crash", how
        before = time.monotonic() - LOSE_S
        # Samples from before an earlier outage may be larger than the file now (it was cut back).
        size = min(max((s for t, s in self.samples if t <= before), default=0), self._size())
        self.redis.kill()
        self.samples.clear()
        lost = self._size() - size
        with open(self.aof, "r+b") as f:
            f.truncate(size)
        print(f"\ncrash: Redis SIGKILLed; its AOF cut back by {lost} bytes (the last {LOSE_S:g} s of writes)")

    def up(self) -> None:
        self.samples.clear()
        self.redis.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
