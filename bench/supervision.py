"""What supervision costs Redis, with a long queue: the supervisor against the old client watchdog.

    python bench/supervision.py                 # 64 jobs x 782 strips = 50,048 queued, 10 s windows
    python bench/supervision.py --jobs 4 --strips 250 --width 8000 --window 5   # ~190 KB inline strips (8 rows + halos)

Starts its own Redis and 2 workers that take only stitches, so every strip stays queued while
their liveness beats and supervisors run. Publishes the jobs (tiny images, so the queue is long
but small), then measures Redis's busy time, from `INFO commandstats` (microseconds spent
executing commands) and `INFO cpu` (the server process's CPU time), over windows of `--window`
seconds:

1. supervision alone: 2 workers beating, one supervising;
2. the same plus one waiting client per job (`Job.waiter`, stepping at its own pace);
3. the old watchdog (luminagrid before supervision moved into the cluster): every waiting
   client ran one look per second, a Lua scan of the whole queue and the unacked hash for its
   job's unfinished strips; its cost is one look, timed here, times the number of jobs;
4. the look the supervisor makes after an event (a Redis restart, a lost worker): the whole
   queue read a page at a time, with the longest single command.

Prints a table and writes JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from luminagrid import broker, queues  # noqa: E402
from luminagrid.app import use_broker  # noqa: E402
from luminagrid.jobs import Params, submit_pixels  # noqa: E402
from luminagrid.local import LocalRedis, LocalWorker, wait_for_workers  # noqa: E402
from luminagrid.settings import QUEUE, STITCH_QUEUE, Settings  # noqa: E402

# The watchdog every waiting client ran once a second before this change (luminagrid 0.1,
# jobs.py `_FIND_TASKS_LUA`): per queued and unacknowledged message, look for each of its
# job's unfinished task ids in the message's tail.
OLD_WATCHDOG_LUA = """
local found = {}
local function scan(values, where)
  for _, v in ipairs(values) do
    local tail = string.sub(v, -4096)
    for i, id in ipairs(ARGV) do
      if not found[i] and string.find(tail, '"' .. id .. '"', 1, true) then found[i] = where end
    end
  end
end
scan(redis.call('LRANGE', KEYS[1], 0, -1), 1)
scan(redis.call('HVALS', KEYS[2]), 2)
local out = {}
for i = 1, #ARGV do out[i] = found[i] or 0 end
return out
"""


def busy(client: object) -> tuple[float, float, dict[str, float]]:
    """(command microseconds, server CPU seconds, microseconds per command) so far."""
    stats = client.info("commandstats")  # type: ignore[attr-defined]
    per = {name.removeprefix("cmdstat_"): float(v["usec"]) for name, v in stats.items()}
    cpu = client.info("cpu")  # type: ignore[attr-defined]
    return sum(per.values()), float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]), per


def window(client: object, seconds: float, during: object = None) -> dict[str, object]:
    """Redis's busy time per second over `seconds`, while `during()` runs (if given)."""
    usec0, cpu0, per0 = busy(client)
    started = time.monotonic()
    if during is None:
        time.sleep(seconds)
    else:
        during(started + seconds)  # type: ignore[operator]
    elapsed = time.monotonic() - started
    usec1, cpu1, per1 = busy(client)
    top = sorted(((per1[k] - per0.get(k, 0.0)) / elapsed / 1000, k) for k in per1)[::-1][:6]
    return {
        "command_ms_per_s": (usec1 - usec0) / elapsed / 1000,
        "cpu_ms_per_s": (cpu1 - cpu0) / elapsed * 1000,
        "top_commands_ms_per_s": {k: round(v, 3) for v, k in top if v > 0},
        "seconds": elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument("--strips", type=int, default=782, help="strips per job (64 x 782 = 50,048)")
    parser.add_argument("--window", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--width", type=int, default=8, help="image width: a strip of 8 rows and its halos is ~24 x width bytes, inline up to 256 KiB")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="lg-bench-")
    folder = Path(tmp.name)
    redis = LocalRedis(folder).start()
    host = os.uname().nodename
    nodes = [LocalWorker(f"bench{i}@{host}", redis.url, 1, log_path=folder / f"bench{i}.log",
                         extra_args=["--queues", STITCH_QUEUE]) for i in (1, 2)]
    report: dict[str, object] = {"jobs": args.jobs, "strips_per_job": args.strips, "settings": vars(Settings())}
    try:
        use_broker(redis.url)
        for node in nodes:
            node.start()
        wait_for_workers([n.name for n in nodes], [n.proc for n in nodes if n.proc])
        client = broker.client(redis.url)

        started = time.monotonic()
        params = Params(op="canny", strips=args.strips, codec="lossless").validate()  # type: ignore[arg-type]
        image = np.random.default_rng(1).integers(0, 255, (8 * args.strips, args.width), dtype=np.uint8)
        jobs = [submit_pixels(image, params) for _ in range(args.jobs)]
        for job in jobs:
            job.kept.clear()  # durable: let the waiters be plain waiters
        queued = queues.queued_count(client, QUEUE)
        publish_s = time.monotonic() - started
        print(f"published {args.jobs} jobs x {args.strips} strips: {queued} queued in {publish_s:.0f} s "
              f"({client.info('memory')['used_memory_human']} in Redis)")
        time.sleep(3)  # let the supervisor settle (its first look ran before the jobs)

        report["queued"] = queued
        report["supervision"] = window(client, args.window)

        waiters = [job.waiter(timeout_s=3600) for job in jobs]

        def wait_all(until: float) -> None:
            while time.monotonic() < until:
                for w in waiters:
                    w.step()
                time.sleep(min(w.pause_s for w in waiters))
        report["supervision_and_waiting_clients"] = window(client, args.window, wait_all)

        ids = [job.strip_task_id(i) for i in range(args.strips)]
        looks = []
        for _ in range(3):
            t0 = time.perf_counter()
            client.eval(OLD_WATCHDOG_LUA, 2, QUEUE, "unacked", *ids)
            looks.append(time.perf_counter() - t0)
        look_s = sorted(looks)[1]
        t0 = time.perf_counter()
        client.eval(OLD_WATCHDOG_LUA, 2, QUEUE, "unacked", ids[0])
        look_one_s = time.perf_counter() - t0
        report["old_watchdog"] = {"one_look_ms": look_s * 1000, "one_look_one_id_ms": look_one_s * 1000,
                                  "command_ms_per_s": look_s * 1000 * args.jobs}

        t0 = time.perf_counter()
        pages = []
        start = 0
        while True:  # what `queues.find_queued` does, page by page, timed
            p0 = time.perf_counter()
            page = client.eval(queues._IDS_LUA, 1, QUEUE, "list", start, queues.PAGE, queues.PAGE_BYTES)
            pages.append(time.perf_counter() - p0)
            if page[1] or not page[0]:
                break
            start += page[0]
            time.sleep(queues.PAGE_PAUSE_S)
        report["event_look"] = {"total_ms": (time.perf_counter() - t0) * 1000, "pages": len(pages),
                                "longest_page_ms": max(pages) * 1000, "median_page_ms": sorted(pages)[len(pages) // 2] * 1000}
    finally:
        for node in nodes:
            node.stop()
        redis.stop()
        tmp.cleanup()

    sup, both, old, look = (report[k] for k in ("supervision", "supervision_and_waiting_clients", "old_watchdog", "event_look"))
    rows = [
        (f"supervision: 2 workers beating, 1 supervising ({args.jobs} active jobs)", f"{sup['command_ms_per_s']:.2f}", f"{sup['cpu_ms_per_s']:.1f}"),
        (f"supervision + {args.jobs} waiting clients polling", f"{both['command_ms_per_s']:.2f}", f"{both['cpu_ms_per_s']:.1f}"),
        (f"old watchdog: {args.jobs} clients x 1 look/s ({old['one_look_ms']:.0f} ms a look)", f"{old['command_ms_per_s']:.0f}", ""),
    ]
    print(f"\nRedis busy, {report['queued']} queued strips, {args.jobs} active jobs (ms per second; target <= 5 for supervision)")
    print(f"{'what':<72} {'commands':>9} {'cpu':>7}")
    for name, commands, cpu in rows:
        print(f"{name:<72} {commands:>9} {cpu:>7}")
    print(f"\nsupervision's top commands (ms/s): {sup['top_commands_ms_per_s']}")
    print(f"old watchdog, one look with 1 task id: {old['one_look_one_id_ms']:.0f} ms")
    print(f"the look after an event: {look['pages']} pages (at most {queues.PAGE} messages or "
          f"{queues.PAGE_BYTES >> 20} MB each), {look['total_ms']:.0f} ms in all, "
          f"longest page {look['longest_page_ms']:.1f} ms (median {look['median_page_ms']:.1f} ms)")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"supervision-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"JSON: {path}")


if __name__ == "__main__":
    main()
