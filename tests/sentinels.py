"""A replicated Redis for the failover tests: a primary, a replica and three sentinels, real processes.

Fast failover settings (FIELD-NOTES §10): a master that misses pings for 1 s is down for a sentinel;
two of the three agreeing start a failover (`failover-timeout` 3 s, one replica at a time). Every
process listens on 127.0.0.1 only, on free ports; `stop()` ends each by PID, also after a failure.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from luminagrid.local import LocalRedis, LocalSentinel, free_port

MASTER = "lgmaster"
PASSWORD = "failover-secret"
SENTINELS = 3
QUORUM = 2
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000


def _connect(port: int, password: str | None = PASSWORD) -> redis.Redis:
    return redis.Redis("127.0.0.1", port, password=password, socket_timeout=1, socket_connect_timeout=1)


@dataclass
class Replicated:
    """Two Redis nodes (one primary, one replica: which is which changes with failovers) and the
    sentinels that watch them."""

    folder: Path
    nodes: list[LocalRedis] = field(default_factory=list)
    sentinels: list[LocalSentinel] = field(default_factory=list)

    @property
    def url(self) -> str:
        """LUMINAGRID_BROKER_URL: every sentinel; the Redis password on the first part (the master's)."""
        return ";".join(f"sentinel://:{PASSWORD}@127.0.0.1:{s.port}/0" if n == 0 else s.url
                        for n, s in enumerate(self.sentinels))

    def start(self) -> Replicated:
        try:
            primary = self._node("a", free_port())
            replica = self._node("b", free_port())
            primary.start()
            self.replicate(replica, primary.port)
            replica.start()
            self.wait(lambda: self.link_up(replica, primary), 30, "the replica's first sync")
            for n in range(SENTINELS):
                self.sentinels.append(LocalSentinel(
                    self.folder / f"sentinel{n + 1}", free_port(), MASTER, primary.port, QUORUM,
                    DOWN_AFTER_MS, FAILOVER_TIMEOUT_MS, parallel_syncs=1, master_password=PASSWORD).start())
            # A failover needs the quorum to know each other (they meet through the master, every 2 s).
            self.wait(lambda: all(m["num-other-sentinels"] == SENTINELS - 1 for m in self._masters()), 30,
                      "the sentinels to find each other")
            self.wait_synced(30)
        except BaseException:
            self.stop()
            raise
        return self

    def _node(self, name: str, port: int) -> LocalRedis:
        # Either node may become a replica: both know the password to replicate with.
        node = LocalRedis(self.folder / name, port=port, password=PASSWORD, extra_args=("--masterauth", PASSWORD))
        self.nodes.append(node)
        return node

    @staticmethod
    def replicate(node: LocalRedis, of_port: int | None) -> None:
        """Start `node` (next time) as a replica of 127.0.0.1:`of_port`, or as a master (None)."""
        node.extra_args = ("--masterauth", PASSWORD, *(("--replicaof", "127.0.0.1", str(of_port)) if of_port else ()))

    # --- what the sentinels say ---------------------------------------------------------------------

    def _masters(self) -> list[dict]:
        """Each sentinel's view of the master (`SENTINEL MASTER`)."""
        out = []
        for s in self.sentinels:
            with _connect(s.port, None) as r:
                out.append(r.sentinel_master(MASTER))
        return out

    def master_ports(self) -> set[int]:
        """The master's port according to each sentinel that answers (one port when they agree)."""
        ports = set()
        for s in self.sentinels:
            with contextlib.suppress(redis.RedisError, OSError), _connect(s.port, None) as r:
                ports.add(int(r.sentinel_get_master_addr_by_name(MASTER)[1]))
        return ports

    def watch_failover(self, old_port: int) -> Callable[[], float | None]:
        """Start timing now; the returned function gives the seconds until every sentinel named
        another master than `old_port` (None while they have not)."""
        started = time.monotonic()
        box: dict[str, float] = {}

        def poll() -> None:
            while time.monotonic() - started < 60:
                ports = self.master_ports()
                if ports and old_port not in ports and len(ports) == 1:
                    box["s"] = time.monotonic() - started
                    return
                time.sleep(0.02)

        threading.Thread(target=poll, daemon=True).start()
        return lambda: box.get("s")

    def master(self) -> LocalRedis:
        """The node every sentinel names as master (fails if they disagree)."""
        ports = self.master_ports()
        assert len(ports) == 1, f"the sentinels disagree on the master: {ports}"
        return next(n for n in self.nodes if n.port in ports)

    def replica(self) -> LocalRedis:
        master = self.master()
        return next(n for n in self.nodes if n is not master)

    # --- the nodes ----------------------------------------------------------------------------------

    @staticmethod
    def info(node: LocalRedis) -> dict:
        with _connect(node.port) as r:
            return dict(r.info("replication"))

    def link_up(self, replica: LocalRedis, master: LocalRedis) -> bool:
        """`replica` replicates `master`, its link up."""
        try:
            info = self.info(replica)
        except (redis.RedisError, OSError):
            return False
        return info.get("role") == "slave" and int(info.get("master_port", 0)) == master.port \
            and info.get("master_link_status") == "up"

    def wait_synced(self, timeout_s: float = 30) -> None:
        """Until the sentinels agree on the master, its replica has acknowledged every write so far, and
        every sentinel sees that replica up (a replica it thinks down cannot be promoted)."""
        def synced() -> bool:
            try:
                master = self.master()
                replica = next(n for n in self.nodes if n is not master)
                if not self.link_up(replica, master):
                    return False
                with _connect(master.port) as r:
                    if int(r.execute_command("WAIT", 1, 500)) < 1:
                        return False
                return all(any(int(x["port"]) == replica.port and x["flags"] == "slave"
                               and x.get("master-link-status") == "ok" for x in self._replicas(s)) for s in self.sentinels)
            except (redis.RedisError, OSError, AssertionError, StopIteration):
                return False
        self.wait(synced, timeout_s, "the replica in sync and seen up by every sentinel")

    def _replicas(self, sentinel: LocalSentinel) -> list[dict]:
        with _connect(sentinel.port, None) as r:
            return list(r.sentinel_slaves(MASTER))

    def repl_offset(self, node: LocalRedis) -> int:
        return int(self.info(node)["master_repl_offset"])

    def cut_replication(self, master: LocalRedis) -> None:
        """Drop the master's connection to its replica (which, stopped, cannot reconnect): what the
        master writes from now on reaches no replica."""
        with _connect(master.port) as r:
            r.execute_command("CLIENT", "KILL", "TYPE", "replica")

    @staticmethod
    def wait(condition, timeout_s: float, what: str, poll_s: float = 0.02) -> float:  # noqa: ANN001
        """Poll `condition` until true; the time it took (raise after `timeout_s`)."""
        started = time.monotonic()
        while not condition():
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
            time.sleep(poll_s)
        return time.monotonic() - started

    def stop(self) -> None:
        for s in self.sentinels:
            s.stop()
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(node.proc.pid, signal.SIGCONT)  # a node a failed test left stopped
            node.stop()
