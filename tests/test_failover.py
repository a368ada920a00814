"""Redis Sentinel failover with real processes: a primary, a replica, three sentinels, two workers.

The workers load `tests/faults.py` (every strip computes for `STRIP_DELAY_S`, so a kill lands
mid-job; runs are recorded) and talk to Redis only through `sentinel://` URLs. Every payload
travels as a claim check (`LUMINAGRID_INLINE_MAX_BYTES=0`), so claims cross the failovers too.
Each test prints the time from the kill to the result (also without `-s`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import cv2
import faults
import numpy as np
import pytest
from celery.worker.consumer.connection import Connection as ConsumerConnection
from kombu.transport import redis as kombu_redis
from redis.sentinel import SentinelManagedConnection
from conftest import CLI, REPO, synthetic, wait_for
from sentinels import MASTER, PASSWORD, Replicated

import luminagrid
from luminagrid import broker, jobs
from luminagrid import record as records
from luminagrid.app import app, use_broker
from luminagrid.backend import PollingSentinelBackend, backend_url
from luminagrid.errors import ConfigError
from luminagrid.local import LocalRedis, LocalSentinel, LocalWorker, celery_env, free_port, wait_for_workers
from luminagrid.settings import Settings

STRIP_DELAY_S = 0.3
#: Generous bounds on kill -> result (measured: 3.7-4.2 s, lost writes 7.8-8.6 s): a command retried
#: against the dead master's address for a minute (`workarounds`, redis-py) took 57 s.
DONE_WITHIN_S = 20
LOST_WRITES_DONE_WITHIN_S = 30
#: How long the replica is held stopped in the lost-writes test: under the sentinels'
#: down-after (1 s), so they still count it as a good replica to promote.
STOP_S = 0.9
JOB_TIMEOUT_S = 60
RUN_TIMEOUT_S = 60


@dataclass
class Rig:
    redis: Replicated
    workers: list[LocalWorker]
    runs: Path

    def env(self) -> dict[str, str]:
        """For a `cli.py` subprocess on the sentinels."""
        return celery_env(self.redis.url, {"LUMINAGRID_SENTINEL_MASTER": MASTER})

    def down(self) -> list[LocalRedis]:
        return [n for n in self.redis.nodes if n.proc is None or n.proc.poll() is not None]

    def heal(self) -> None:
        """Every Redis node up, the one that died back as a replica of the current master, in sync."""
        for node in self.down():
            self.redis.replicate(node, self.redis.master().port)
            node.start()
        self.redis.wait_synced(30)


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    folder = Path(tempfile.mkdtemp(prefix="lg-ha-"))  # short: unix socket paths are limited
    runs = folder / "runs.log"
    before = (str(app.conf.broker_url), str(app.conf.result_backend).split("+", 1)[-1])
    replicated = Replicated(folder)
    workers: list[LocalWorker] = []
    env = {"LUMINAGRID_SENTINEL_MASTER": MASTER, "LUMINAGRID_TEST_STRIP_DELAY_S": str(STRIP_DELAY_S),
           "LUMINAGRID_TEST_RUNS": str(runs), "LUMINAGRID_INLINE_MAX_BYTES": "0", "PYTHONPATH": str(REPO / "tests")}
    try:
        replicated.start()
        use_broker(replicated.url, master=MASTER)
        for n in range(2):
            workers.append(LocalWorker(f"ha{n + 1}@{os.uname().nodename}", replicated.url, 1, folder / f"ha{n + 1}.log",
                                       extra_env=env, extra_args=["--include", "faults"]).start())
        wait_for_workers([w.name for w in workers], [w.proc for w in workers if w.proc])
        yield Rig(replicated, workers, runs)
    finally:
        for w in workers:
            w.stop()
        replicated.stop()
        use_broker(*before)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def _every_payload_as_a_claim(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUMINAGRID_INLINE_MAX_BYTES", "0")


@pytest.fixture
def ha(rig: Rig, request: pytest.FixtureRequest) -> Iterator[Rig]:
    use_broker(rig.redis.url, master=MASTER)
    failed_before = request.session.testsfailed
    yield rig
    if request.session.testsfailed > failed_before:  # what a failed test needs to be diagnosed
        print_logs(rig)
    dead = [w.name for w in rig.workers if w.proc is None or w.proc.poll() is not None]
    assert not dead, f"workers exited: {dead}"


def print_logs(rig: Rig, lines: int = 40) -> None:
    for log in [*(rig.redis.folder.glob("*/*.log")), *(rig.redis.folder.glob("*.log"))]:
        print(f"--- {log} ---", *log.read_text(errors="replace").splitlines()[-lines:], sep="\n")


def report(request: pytest.FixtureRequest, text: str) -> None:
    """Print to the terminal even while pytest captures output."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if capture is None:
        print(text)
        return
    with capture.global_and_fixture_disabled():
        print(f"\n{text}", flush=True)


def exact(image: np.ndarray) -> np.ndarray:
    return cv2.Canny(image, 30, 90)


def running(rig: Rig, job: jobs.Job) -> dict | None:
    """A run of one of the job's strips that started and has not ended."""
    runs = faults.runs(rig.runs)
    ended = {(r["task"], r["pid"]) for r in runs if r["what"] == "end"}
    return next((r for r in runs if r["what"] == "start" and str(r["task"]).startswith(job.id)
                 and (r["task"], r["pid"]) not in ended), None)


def runs_after(rig: Rig, job: jobs.Job, t: float) -> list[dict]:
    return [r for r in faults.runs(rig.runs) if str(r["task"]).startswith(job.id) and r["t"] > t]


@dataclass
class Kill:
    """A master SIGKILLed mid-job."""

    image: np.ndarray
    job: jobs.Job
    victim: LocalRedis
    at: float  # monotonic
    wall: float  # time.time(), as the run records
    failover_s: Callable[[], float | None]


def kill_mid_strip(rig: Rig, seed: int) -> Kill:
    """Submit a job; SIGKILL the master while one of its strips computes."""
    image = synthetic(seed, 400, 333)
    job = luminagrid.submit(image, strips=8, codec="lossless", low=30, high=90)
    wait_for(lambda: running(rig, job), 30, "a strip to start")
    victim = rig.redis.master()
    victim.kill()
    at, wall = time.monotonic(), time.time()
    return Kill(image, job, victim, at, wall, rig.redis.watch_failover(victim.port))


def outcome(kill: Kill) -> tuple[jobs.JobResult, float, bool]:
    """Wait for the killed-over job: its result, seconds from the kill, and whether it is exact."""
    result = kill.job.wait(JOB_TIMEOUT_S)
    done_s = time.monotonic() - kill.at
    return result, done_s, bool(np.array_equal(result.edges, exact(kill.image)))


def survived(rig: Rig, kill: Kill, node: LocalRedis, same: bool, done_s: float) -> None:
    """`node` is the master now, the output exact, in seconds, and the kill came mid-job."""
    promoted(rig, node)
    assert same
    assert done_s < DONE_WITHIN_S
    assert runs_after(rig, kill.job, kill.wall), "the kill came after the job's last strip"


def promoted(rig: Rig, node: LocalRedis) -> float:
    """Wait until every sentinel names `node` the master."""
    return rig.redis.wait(lambda: rig.redis.master_ports() == {node.port}, 30, f"the sentinels to agree on port {node.port}")


# --- URLs and settings --------------------------------------------------------------------------

def test_a_sentinel_url_is_parsed_redacted_and_mapped_onto_celery(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "sentinel://:s3cret@10.0.0.1:26379/2;sentinel://10.0.0.2;sentinel://:s3cret@10.0.0.3:26380/2"
    parsed = broker.parse_sentinel(url)
    assert parsed.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("10.0.0.3", 26380))
    assert (parsed.password, parsed.db) == ("s3cret", 2)
    shown = broker.redacted(url)
    assert "s3cret" not in shown and shown.count(":***@") == 2
    assert broker.redacted("sentinel://h:1;sentinel://user:pw@h2:2/0") == "sentinel://h:1;sentinel://user:***@h2:2/0"
    assert backend_url(url) == f"luminagrid.backend:PollingSentinelBackend+{url}"
    assert broker.sentinel_options("redis://localhost:6379/0", None) == {}
    options = broker.sentinel_options(url, "mymaster", "sentinel-pw")
    assert options["master_name"] == "mymaster" and options["sentinel_kwargs"]["password"] == "sentinel-pw"
    assert options["sentinel_kwargs"]["socket_timeout"] > 0  # Celery's backend gives sentinels no timeout by default

    monkeypatch.setenv("LUMINAGRID_BROKER_URL", url)
    monkeypatch.setenv("LUMINAGRID_SENTINEL_MASTER", "mymaster")
    settings = Settings.from_env()
    assert (settings.broker_url, settings.result_backend, settings.sentinel_master) == (url, url, "mymaster")
    # Celery: kombu's Sentinel transport and the Sentinel variant of luminagrid's backend, both told
    # the master's name; back on a plain URL, no Sentinel option is left behind.
    before = (str(app.conf.broker_url), str(app.conf.result_backend).split("+", 1)[-1])
    try:
        use_broker(url, master="mymaster")
        assert app.conf.broker_transport_options["master_name"] == "mymaster"
        assert app.conf.result_backend_transport_options["master_name"] == "mymaster"
        assert app.conf.broker_transport_options["visibility_timeout"] == settings.visibility_timeout_s
        assert isinstance(app.backend, PollingSentinelBackend)  # builds no connection yet
        use_broker("redis://127.0.0.1:1/0")
        assert "master_name" not in app.conf.broker_transport_options
        assert "master_name" not in app.conf.result_backend_transport_options
        assert type(app.backend).__name__ == "PollingRedisBackend"
    finally:
        use_broker(*before)
    # kombu's Sentinel channel is a subclass of its Redis channel: luminagrid's patch of the latter
    # (a detached transport is a connection error, `workarounds`) reaches it.
    assert getattr(kombu_redis.SentinelChannel._connparams, "_luminagrid_fixed", False)
    # A command retried across a failover reconnects through the sentinels (`workarounds`).
    assert getattr(SentinelManagedConnection.connect_check_health, "_luminagrid_fixed", False)


def test_a_workers_stats_reply_never_carries_the_sentinels_password() -> None:
    options = {"visibility_timeout": 60, **broker.sentinel_options("sentinel://h:1", "m", "sentinel-pw")}
    live = SimpleNamespace(info=lambda: {"hostname": "h", "password": "redis-pw", "transport_options": options})
    reply = ConsumerConnection.info(ConsumerConnection.__new__(ConsumerConnection), SimpleNamespace(connection=live))
    assert "sentinel-pw" not in json.dumps(reply) and "redis-pw" not in json.dumps(reply)
    assert reply["broker"]["transport_options"]["sentinel_kwargs"]["socket_timeout"] > 0
    assert options["sentinel_kwargs"]["password"] == "sentinel-pw"  # the connection's own options untouched


@pytest.mark.parametrize(("url", "says"), [
    ("sentinel://:pw@h:1;redis://h2:6379", "is not a sentinel:// URL"),
    ("sentinel://h:notaport", "has a bad port"),
    ("sentinel://:pw@h:1/0;sentinel://:other@h2:2", "from the first part only"),
    ("sentinel://h:1/zero", "not a number"),
])
def test_a_malformed_sentinel_url_is_refused_naming_the_part_and_the_fix(
    monkeypatch: pytest.MonkeyPatch, url: str, says: str,
) -> None:
    monkeypatch.setenv("LUMINAGRID_BROKER_URL", url)
    monkeypatch.setenv("LUMINAGRID_SENTINEL_MASTER", "mymaster")
    with pytest.raises(ConfigError) as error:
        Settings.from_env()
    message = str(error.value)
    assert says in message and "LUMINAGRID_BROKER_URL" in message and "write it as sentinel://" in message
    assert "other" not in message  # no password in the message


def test_a_sentinel_url_without_the_master_name_fails_saying_which_setting_to_set(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    monkeypatch.setenv("LUMINAGRID_BROKER_URL", "sentinel://:pw@127.0.0.1:1;sentinel://127.0.0.1:2")
    monkeypatch.delenv("LUMINAGRID_SENTINEL_MASTER", raising=False)
    with pytest.raises(ConfigError) as error:
        Settings.from_env()
    message = str(error.value)
    assert "LUMINAGRID_BROKER_URL is a Sentinel URL" in message
    assert "set LUMINAGRID_SENTINEL_MASTER to the NAME of their `sentinel monitor NAME" in message
    with pytest.raises(ConfigError):
        broker.client("sentinel://127.0.0.1:1")
    # The command line: one line, exit 1, no traceback.
    env = {k: v for k, v in os.environ.items() if k != "LUMINAGRID_SENTINEL_MASTER"}
    done = subprocess.run([*CLI, "workers"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("error: LUMINAGRID_BROKER_URL is a Sentinel URL") and "Traceback" not in done.stderr
    assert "pw" not in done.stderr


# --- the replicated cluster ------------------------------------------------------------------------

def test_every_redis_client_of_luminagrid_follows_the_sentinels_to_the_master(ha: Rig) -> None:
    master = ha.redis.master()
    assert isinstance(app.backend, PollingSentinelBackend)
    assert app.conf.broker_transport_options["master_name"] == MASTER
    assert app.conf.result_backend_transport_options["master_name"] == MASTER
    for client in (records.fast_client(), records.client(), broker.client(ha.redis.url, master=MASTER)):
        assert int(client.info("server")["tcp_port"]) == master.port
    assert broker.answers(ha.redis.url, master=MASTER)
    assert not broker.answers(ha.redis.url, master="no-such-master")


def test_a_primary_sigkilled_mid_job_fails_over_and_the_job_completes_exactly(
    ha: Rig, request: pytest.FixtureRequest,
) -> None:
    ha.heal()
    replica = ha.redis.replica()
    kill = kill_mid_strip(ha, 61)
    assert kill.victim is not replica
    result, done_s, same = outcome(kill)
    report(request, f"failover: primary SIGKILLed mid-strip; sentinels named the replica master "
                    f"{kill.failover_s() or float('nan'):.2f} s after the kill; job done, {'exact' if same else 'WRONG'}, "
                    f"{done_s:.2f} s after the kill ({result.republished} recovery event(s))")
    survived(ha, kill, replica, same, done_s)


def test_the_old_primary_comes_back_as_a_replica_and_a_second_failover_completes_another_job(
    ha: Rig, request: pytest.FixtureRequest,
) -> None:
    if not ha.down():  # run alone: make an old primary first
        old = ha.redis.master()
        old.kill()
        promoted(ha, next(n for n in ha.redis.nodes if n is not old))
    [old] = ha.down()
    new = ha.redis.master()
    # Restarted as its own configuration says (a master, empty): the sentinels make it a replica of
    # the new master (after letting a node that reports a role they did not expect settle for a while).
    ha.redis.replicate(old, None)
    old.start()
    rejoined_s = ha.redis.wait(lambda: ha.redis.link_up(old, new), 60, "the sentinels to make the old primary a replica")
    ha.redis.wait_synced(30)
    kill = kill_mid_strip(ha, 62)
    assert kill.victim is new
    result, done_s, same = outcome(kill)
    report(request, f"second failover: the old primary, restarted, was a replica of the new one {rejoined_s:.1f} s "
                    f"later; the new primary SIGKILLed mid-strip; sentinels named the old one master "
                    f"{kill.failover_s() or float('nan'):.2f} s after the kill; job done, {'exact' if same else 'WRONG'}, "
                    f"{done_s:.2f} s after the kill")
    survived(ha, kill, old, same, done_s)


def test_writes_the_promoted_replica_never_received_are_republished_and_the_output_stays_exact(
    ha: Rig, request: pytest.FixtureRequest,
) -> None:
    """Replication is asynchronous: the replica is stopped and cut off while the primary takes a
    whole job (its record, payloads, strip messages, first results); then the primary dies and the
    replica, which has none of it, is promoted. The submitter writes the job again (it keeps the
    payloads until Redis has surely kept them) and the supervisor publishes the lost strips again."""
    ha.heal()
    primary, replica = ha.redis.master(), ha.redis.replica()
    image = synthetic(63, 480, 300)
    assert replica.proc is not None
    os.kill(replica.proc.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        ha.redis.cut_replication(primary)  # what the primary writes from now on reaches no replica
        job = luminagrid.submit(image, strips=8, codec="lossless", low=30, high=90)
        db = records.fast_client()
        wait_for(lambda: len(records.progress(job.id, db)) >= 2, 10, "two strips' results stored on the primary")
        written = ha.redis.repl_offset(primary)
        primary.kill()
        killed_at = time.monotonic()
        failover_s = ha.redis.watch_failover(primary.port)
        held_s = STOP_S - (killed_at - stopped_at)
        if held_s > 0:
            time.sleep(held_s)  # hold the fault for its fixed time
    finally:
        os.kill(replica.proc.pid, signal.SIGCONT)
    stopped_s = time.monotonic() - stopped_at
    result = job.wait(JOB_TIMEOUT_S)
    done_s = time.monotonic() - killed_at
    same = np.array_equal(result.edges, exact(image))
    promoted(ha, replica)
    # The promoted replica's history ends where its link was cut: everything after is lost.
    promoted_at = int(ha.redis.info(replica)["second_repl_offset"]) - 1
    lost = written - promoted_at
    report(request, f"lost writes: replica stopped {stopped_s:.2f} s and cut off; {lost} bytes of the primary's writes "
                    f"(the whole job and 2+ results) never reached it; primary SIGKILLed; replica named master "
                    f"{failover_s() or float('nan'):.2f} s after the kill; {result.republished} recovery event(s); "
                    f"job done, {'exact' if same else 'WRONG'}, {done_s:.2f} s after the kill")
    assert lost > 0, (written, promoted_at)
    assert same
    assert done_s < LOST_WRITES_DONE_WITHIN_S
    assert result.republished > 0, "nothing was republished: the lost strips were not recovered by the supervisor"
    starts = Counter(r["task"] for r in faults.runs(ha.runs) if r["what"] == "start" and str(r["task"]).startswith(job.id))
    assert any(n > 1 for n in starts.values()), f"no strip ran again, yet results were lost: {starts}"


def test_cli_submit_status_result_and_workers_work_on_the_sentinel_url(ha: Rig, tmp_path: Path) -> None:
    ha.heal()
    image = synthetic(64, 200, 180)
    source = tmp_path / "photo.png"
    cv2.imwrite(str(source), image)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*CLI, *args], env=ha.env(), cwd=tmp_path, capture_output=True, text=True,
                              timeout=RUN_TIMEOUT_S)
        assert done.returncode == 0, f"cli.py {' '.join(args)}: {done.stderr}"
        assert PASSWORD not in done.stdout + done.stderr
        return done

    names = {json.loads(line)["name"] for line in cli("workers", "--json").stdout.splitlines()}
    assert {w.name for w in ha.workers} <= names
    submitted = json.loads(cli("submit", str(source), "--detach", "--json", "--codec", "lossless",
                               "--low", "30", "--high", "90").stdout.splitlines()[0])
    job_id = submitted["job_id"]
    wait_for(lambda: json.loads(cli("status", job_id, "--json").stdout)["state"] == "done", 30, "the job to finish")
    cli("result", job_id, "-o", str(tmp_path / "edges.png"))
    assert np.array_equal(cv2.imread(str(tmp_path / "edges.png"), cv2.IMREAD_GRAYSCALE), exact(image))


def test_the_sentinels_password_from_the_environment_reaches_the_command_lines_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`cli.py` checks the broker with the configured master's name only: the sentinels' own
    password (LUMINAGRID_SENTINEL_PASSWORD) must still come from the environment."""
    master = LocalRedis(tmp_path / "master", port=free_port()).start()
    sentinel = None
    try:
        sentinel = LocalSentinel(tmp_path / "sentinel", free_port(), MASTER, master.port, quorum=1,
                                 password="sentinel-secret").start()
        monkeypatch.setenv("LUMINAGRID_SENTINEL_PASSWORD", "sentinel-secret")
        broker.require(sentinel.url, master=MASTER)  # as cli.py calls it: raised BrokerUnreachable before
    finally:
        if sentinel is not None:
            sentinel.stop()
        master.stop()
