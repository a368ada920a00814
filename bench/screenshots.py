"""Fresh Flower screenshots from a real run: docs/flower-workers.png and docs/flower-tasks.png.

    .venv/bin/python bench/screenshots.py [--out-dir docs] [--workers 2] [--port 5599]

It starts `cli.py cluster --workers N` (a private Redis, N worker processes, Flower behind the
basic-auth credentials this script makes and passes with `--flower-auth`), submits real jobs on
examples/coffee.png with `cli.py submit` (Canny whole and in 4 strips, Gaussian blur, bilateral,
non-local-means denoise), waits until Flower has seen every task succeed, then photographs Flower's
Workers and Tasks pages with headless Chromium (`apt-get install chromium`). It stops the cluster
it started by its PID (SIGTERM: the cluster stops Flower, the workers and Redis).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import cv2
from photos import photo_like

from luminagrid.local import free_port

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, str(REPO / "cli.py")]
PHOTO = REPO / "examples" / "coffee.png"
#: The jobs, in order (Flower lists the last first): (input, what else to pass to `submit`). "big" is
#: a 3840x2160 photo-like PNG made from coffee.png (bench/photos.py), so its strips spread out.
JOBS = [
    ("big", ["--op", "gaussian", "-p", "sigma=3"]),
    ("coffee", ["--op", "canny"]),
    ("coffee", ["--op", "gaussian", "-p", "sigma=2", "--strips", "4"]),
    ("big", ["--op", "canny"]),
    ("coffee", ["--op", "bilateral"]),
    ("coffee", ["--op", "denoise"]),
]
#: Flower's tasks page shows each task's label (its args: `job 5f3a87b2 canny strip 3/9 rows ...`).
TASK_COLUMNS = "name,args,state,received,runtime,worker"
WINDOWS = {"workers": "1400,800", "tasks": "1400,1000"}


class Cluster:
    """`cli.py cluster` as a child process; its printed lines are collected by a thread."""

    def __init__(self, workers: int, port: int, auth: str) -> None:
        self.lines: list[str] = []
        # Flower takes options from FLOWER_* variables; `cluster` passes its environment on.
        env = {**os.environ, "FLOWER_TASKS_COLUMNS": TASK_COLUMNS}
        self.proc = subprocess.Popen(
            [*CLI, "cluster", "--workers", str(workers), "--flower-port", str(port), "--flower-auth", auth],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,  # its own process group: a Ctrl-C here does not reach it twice
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def broker_url(self, timeout_s: float = 90) -> str:
        """The LUMINAGRID_BROKER_URL the cluster prints once Redis, the workers and Flower are up."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.lines:
                if m := re.search(r"LUMINAGRID_BROKER_URL=(\S+)", line):
                    return m.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise SystemExit("cli.py cluster did not come up:\n" + "\n".join(self.lines))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the cluster stops Flower, workers and Redis itself
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                print("cluster did not stop within 60 s; killing its process group", file=sys.stderr)
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group this script made for it
                self.proc.wait()
        self._reader.join(5)


def flower_api(base: str, auth: str, path: str) -> object:
    request = urllib.request.Request(base + path)
    request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(request, timeout=5) as reply:
        return json.load(reply)


def wait_for_flower(base: str, auth: str, workers: int, tasks_at_least: int, timeout_s: float = 60) -> dict:
    """Until Flower lists `workers` online workers and at least that many tasks, all succeeded."""
    deadline = time.monotonic() + timeout_s
    tasks: dict = {}
    online: list[str] = []
    while time.monotonic() < deadline:
        try:
            tasks = flower_api(base, auth, "/api/tasks")  # type: ignore[assignment]
            status = flower_api(base, auth, "/api/workers?status=1")
            online = [name for name, up in status.items() if up]  # type: ignore[union-attr]
        except OSError:
            time.sleep(0.5)
            continue
        states = {t.get("state") for t in tasks.values()}
        if len(online) >= workers and len(tasks) >= tasks_at_least and states == {"SUCCESS"}:
            return tasks
        time.sleep(0.5)
    states = sorted({str(t.get("state")) for t in tasks.values()})
    raise SystemExit(f"Flower did not show {workers} workers online and {tasks_at_least} succeeded tasks: "
                     f"online {online}, {len(tasks)} tasks in states {states}")


def screenshot(chromium: str, url: str, out: Path, profile: Path, window: str) -> None:
    """Headless Chromium; `--virtual-time-budget` lets the page's scripts fill its tables first."""
    args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}",
            f"--window-size={window}", "--virtual-time-budget=5000", f"--screenshot={out}", url]
    proc = subprocess.run(args, check=False, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not out.is_file():
        raise SystemExit(f"chromium failed ({proc.returncode}) on {url}:\n{proc.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--port", type=int, default=0, help="Flower's port (default: a free one)")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        raise SystemExit("needs Chromium: apt-get install -y chromium")
    port = args.port or free_port()
    auth = f"admin:{secrets.token_urlsafe(12)}"
    user, password = auth.split(":", 1)
    base = f"http://127.0.0.1:{port}"
    args.out_dir.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="lg-shots-") as tmp:
        cluster = Cluster(args.workers, port, auth)
        try:
            env = {**os.environ, "LUMINAGRID_BROKER_URL": cluster.broker_url()}
            env.pop("LUMINAGRID_RESULT_BACKEND", None)
            print(f"cluster up: Flower at {base}/ ({args.workers} workers)")
            inputs = {"coffee": PHOTO, "big": Path(tmp) / "big.png"}
            cv2.imwrite(str(inputs["big"]), photo_like(3840, 2160))
            expected = 0  # tasks: each job's strips and its stitch
            for n, (name, options) in enumerate(JOBS):
                out = Path(tmp) / f"{n}.png"
                t0 = time.monotonic()
                command = [*CLI, "submit", str(inputs[name]), *options, "-o", str(out)]
                proc = subprocess.run(command, cwd=REPO, env=env, check=False, capture_output=True, text=True,
                                      timeout=300)
                if proc.returncode != 0:
                    raise SystemExit(f"submit {' '.join(options)} failed ({proc.returncode}):\n{proc.stderr}")
                print(f"submit {' '.join(options)}: {time.monotonic() - t0:.2f} s | {proc.stdout.strip()}")
                strips = re.search(r"\| (\d+) strips? ", proc.stdout)
                expected += (int(strips.group(1)) if strips else 1) + 1
            tasks = wait_for_flower(base, auth, args.workers, tasks_at_least=expected)
            names: dict[str, int] = {}
            for t in tasks.values():
                names[t["name"]] = names.get(t["name"], 0) + 1
            print(f"Flower: {len(tasks)} tasks succeeded: {names}")
            time.sleep(2)  # the workers page's counters come from the events just received
            profile = Path(tmp) / "chromium"
            for page, window in WINDOWS.items():
                out = args.out_dir / f"flower-{page}.png"
                # Credentials in the URL: Chromium keeps them for the page's own API calls.
                url = f"http://{user}:{password}@127.0.0.1:{port}/{page}"
                screenshot(chromium, url, out, profile, window)
                print(f"wrote {out} ({out.stat().st_size // 1024} KB)")
        finally:
            cluster.stop()
            print(f"cluster stopped (exit code {cluster.proc.returncode})")


if __name__ == "__main__":
    main()
