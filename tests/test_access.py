"""Access control: passwords in Redis URLs, TLS (`rediss://`), and an embedded Redis kept local."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import trustme
from conftest import CLI, synthetic

from luminagrid import broker
from luminagrid.local import LocalCluster, LocalRedis, LocalWorker, free_port, wait_for_workers

PASSWORD = "s3cret"


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def guarded() -> Iterator[LocalCluster]:
    with LocalCluster(workers=1, password=PASSWORD) as c:
        yield c


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    cv2.imwrite(str(path), synthetic(51, 99, 77))
    return path


def expected(photo: Path) -> np.ndarray:
    return cv2.Canny(cv2.imread(str(photo), cv2.IMREAD_UNCHANGED), 100, 200)


def test_a_password_in_the_url_is_used_and_never_printed(guarded: LocalCluster, photo: Path) -> None:
    assert f":{PASSWORD}@" in guarded.url
    proc = run(["submit", str(photo), "--codec", "lossless"], {**os.environ, "LUMINAGRID_BROKER_URL": guarded.url})
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(cv2.imread(str(photo.with_name("photo.edges.png")), cv2.IMREAD_UNCHANGED), expected(photo))
    assert PASSWORD not in proc.stdout + proc.stderr


@pytest.mark.parametrize("url_password", ["", ":wrong@"])
def test_a_missing_or_wrong_password_is_a_clear_error(guarded: LocalCluster, photo: Path, url_password: str) -> None:
    url = guarded.url.replace(f":{PASSWORD}@", url_password)
    proc = run(["submit", str(photo)], {**os.environ, "LUMINAGRID_BROKER_URL": url})
    assert proc.returncode == 1
    assert "refused the credentials" in proc.stderr or "no Redis answers" in proc.stderr
    assert "wrong" not in proc.stderr and "Traceback" not in proc.stderr
    assert not photo.with_name("photo.edges.png").exists()


class TlsProxy:
    """TLS on 127.0.0.1:port in front of a Redis unix socket (the bundled Redis has no TLS)."""

    def __init__(self, target: Path, context: ssl.SSLContext) -> None:
        self.target, self.context, self.port = target, context, free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_unix_connection(str(self.target))
        await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer))

    def __enter__(self) -> TlsProxy:
        self.thread.start()
        start = asyncio.start_server(self._serve, "127.0.0.1", self.port, ssl=self.context)
        self.server = asyncio.run_coroutine_threadsafe(start, self.loop).result(10)
        return self

    def __exit__(self, *_: object) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_rediss_urls_verify_the_server_certificate(guarded: LocalCluster, photo: Path, tmp_path: Path) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    assert guarded.redis is not None
    with TlsProxy(guarded.redis.socket_path, server_context) as proxy:
        url = f"rediss://:{PASSWORD}@127.0.0.1:{proxy.port}/0"
        env = {**os.environ, "LUMINAGRID_BROKER_URL": url, "LUMINAGRID_REDIS_CA_CERTS": str(ca_file)}
        worker = LocalWorker(f"tls@{os.uname().nodename}", url, extra_env={"LUMINAGRID_REDIS_CA_CERTS": str(ca_file)},
                             log_path=tmp_path / "tls-worker.log").start()
        try:
            wait_for_workers([worker.name], [worker.proc])
            proc = run(["submit", str(photo), "--codec", "lossless", "--strips", "3"], env)
            assert proc.returncode == 0, proc.stderr
            assert np.array_equal(cv2.imread(str(photo.with_name("photo.edges.png")), cv2.IMREAD_UNCHANGED), expected(photo))

            other_ca = tmp_path / "other-ca.pem"
            trustme.CA().cert_pem.write_to_path(str(other_ca))
            refused = run(["submit", str(photo), "-o", str(tmp_path / "x.png")], {**env, "LUMINAGRID_REDIS_CA_CERTS": str(other_ca)})
            assert refused.returncode == 1
            assert "no Redis answers at rediss://:***@127.0.0.1" in refused.stderr and "certificate verify failed" in refused.stderr
            assert not (tmp_path / "x.png").exists()
        finally:
            worker.stop()


def test_the_embedded_redis_listens_only_on_a_private_unix_socket(tmp_path: Path) -> None:
    server = LocalRedis(tmp_path / "r").start()
    try:
        with broker.client(server.url) as r:
            assert r.config_get("port")["port"] == "0"  # no TCP listener at all
            assert r.config_get("bind")["bind"] == "127.0.0.1"
            assert r.config_get("unixsocketperm")["unixsocketperm"] == "700"
    finally:
        server.stop()
