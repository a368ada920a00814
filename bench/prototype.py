"""The original socket prototype's design, rebuilt only to be measured against (never shipped).

One strip per worker, no overlap; each strip goes out as colour JPEG (q95) pickled over a TCP
socket; the worker decodes, converts to gray, runs Canny and sends the edge map back as JPEG,
pickled. Its output is wrong at seams and lossy (FIELD-NOTES section 1); only its speed matters
here. Pickle is used because that design used it: these sockets listen on 127.0.0.1 only.

    python bench/prototype.py worker PORT     # one per worker, started by bench/run.py
"""

from __future__ import annotations

import pickle  # noqa: S403 - reproducing the prototype's wire format, bench only
import socket
import struct
import sys
from pathlib import Path

import cv2
import numpy as np

QUALITY = 95


def _send(sock: socket.socket, obj: object) -> None:
    data = pickle.dumps(obj)
    sock.sendall(struct.pack("!Q", len(data)) + data)


def _recv(sock: socket.socket) -> object:
    def exactly(n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise ConnectionError("peer closed")
            buf += chunk
        return bytes(buf)

    (size,) = struct.unpack("!Q", exactly(8))
    return pickle.loads(exactly(size))  # noqa: S301 - bench only, loopback only


def worker(port: int) -> None:
    cv2.setNumThreads(1)
    with socket.create_server(("127.0.0.1", port)) as server:
        while True:
            conn, _ = server.accept()
            with conn:
                try:
                    while True:
                        jpeg = _recv(conn)
                        bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
                        edges = cv2.Canny(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), 100, 200)
                        _send(conn, cv2.imencode(".jpg", edges, [cv2.IMWRITE_JPEG_QUALITY, QUALITY])[1].tobytes())
                except ConnectionError:
                    continue


class Master:
    """Connections to the workers, kept open between runs (the prototype's workers were warm)."""

    def __init__(self, ports: list[int]) -> None:
        self.socks = [socket.create_connection(("127.0.0.1", p)) for p in ports]

    def run(self, path: Path) -> np.ndarray:
        """Read the image, one strip per worker, and return the stacked (H, W) edge map."""
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        bounds = np.linspace(0, bgr.shape[0], len(self.socks) + 1).astype(int)
        for sock, r0, r1 in zip(self.socks, bounds, bounds[1:]):
            _send(sock, cv2.imencode(".jpg", bgr[r0:r1], [cv2.IMWRITE_JPEG_QUALITY, QUALITY])[1].tobytes())
        parts = [_recv(sock) for sock in self.socks]
        return np.vstack([cv2.imdecode(np.frombuffer(p, np.uint8), cv2.IMREAD_GRAYSCALE) for p in parts])

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(int(sys.argv[2]))
