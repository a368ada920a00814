"""What one Redis carries: strip messages, chord joins and claim-check bytes per second; and per
operation and image size, how many jobs per second one Redis serves and how many workers that takes.

    python bench/capacity.py            # about 3 minutes
    python bench/capacity.py --quick    # about 1.5 minutes: 5 s windows, 1 and 8 MP, one repeat

Starts its own Redis (TCP on 127.0.0.1, as a cluster reaches its Redis) and 2 workers of one pool
process each, supervising as in production (liveness beats, the supervisor, Celery's task events).
Every figure comes from Redis's own counters read before and after (`INFO stats`:
total_commands_processed, total_net_input_bytes, total_net_output_bytes; `INFO cpu`:
used_cpu_sys + used_cpu_user; `INFO memory`: used_memory) and from the worker processes' CPU time
(main and pool processes), less the idle cluster's own rates, measured first:

1. idle: what the cluster costs Redis with no jobs (beats, the supervisor, consumers waiting);
2. messages: jobs of tiny gaussian strips (8 rows of 64 pixels, inline), kept in flight by one
   client that polls as a batch does, for `--window` seconds: 32 strips a job (strip messages),
   then 1 strip a job (chord joins). Measured rates, Redis's CPU share, and the rate one Redis core
   would carry (measured rate / CPU share); from the two, Redis's CPU per strip and per job;
3. claims: jobs of 8 strips of 1 MB (gaussian on noise, lossless: incompressible payloads and
   outputs, every one a claim check): MB/s through Redis, and Redis's CPU per MB;
4. per operation and image size (canny, gaussian, bilateral, denoise at 1, 8 and 24 MP, photo-like
   colour, lossless, default parameters): one job at a time, its Redis traffic (commands, bytes in
   and out, Redis CPU, memory held until collected) and its workers' CPU, against the one-machine
   CPU time of the operation on the whole image (one thread, in this process). Every output is
   compared with the one-machine one. From these: jobs per second one Redis core serves
   (1 / Redis CPU per job), jobs per second a 10 GbE link to Redis carries, and the workers
   (cores, at the workers' measured CPU per job) it takes to reach the smaller of the two.

On 2 cores the client, both workers and Redis share the machine: the measured rates are the
machine's, not Redis's limit. The capacity figures are the Redis-CPU-extrapolated ones, linear up to
100 % of one core (plan for less: queues lengthen well before). Prints tables and writes JSON
under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from photos import noisy, photo_like  # noqa: E402

from luminagrid import batch, broker, claims, ops  # noqa: E402
from luminagrid.app import use_broker  # noqa: E402
from luminagrid.codec import Codec  # noqa: E402
from luminagrid.jobs import Job, Params, submit_pixels  # noqa: E402
from luminagrid.local import LocalRedis, LocalWorker, free_port, redis_server_binary, wait_for_workers  # noqa: E402

#: A 10 GbE link, each way, in bytes per second.
LINK_BYTES_S = 10e9 / 8
SIZES = {"1 MP": (1280, 800), "8 MP": (3840, 2160), "24 MP": (6000, 4000)}
OPS = ("canny", "gaussian", "bilateral", "denoise")
#: One-machine CPU seconds above which a case is timed once (denoise at 8 and 24 MP).
HEAVY_S = 4.0
MB = 1e6


class Meter:
    """Redis's counters and the workers' CPU time, read together."""

    def __init__(self, client: Any, nodes: list[LocalWorker]) -> None:
        self.client, self.nodes = client, nodes

    def _worker_cpu(self) -> float:
        total = 0.0
        for node in self.nodes:
            assert node.proc is not None
            try:
                main = psutil.Process(node.proc.pid)
                for p in [main, *main.children(recursive=True)]:
                    t = p.cpu_times()
                    total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def snap(self) -> dict[str, float]:
        with self.client.pipeline(transaction=False) as pipe:
            pipe.info("stats")
            pipe.info("cpu")
            pipe.info("memory")
            stats, cpu, mem = pipe.execute()
        return {
            "t": time.monotonic(),
            "commands": float(stats["total_commands_processed"]),
            "net_in": float(stats["total_net_input_bytes"]),
            "net_out": float(stats["total_net_output_bytes"]),
            "redis_cpu": float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
            "memory": float(mem["used_memory"]),
            "workers_cpu": self._worker_cpu(),
            "client_cpu": time.process_time(),
        }

    def usec_by_command(self) -> dict[str, float]:
        return {k.removeprefix("cmdstat_"): float(v["usec"]) for k, v in self.client.info("commandstats").items()}


COUNTERS = ("commands", "net_in", "net_out", "redis_cpu", "workers_cpu", "client_cpu")


def delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {"seconds": b["t"] - a["t"], **{k: b[k] - a[k] for k in COUNTERS}}


def less_background(d: dict[str, float], idle: dict[str, float], snaps: float = 0.0) -> dict[str, float]:
    """`d` minus the idle cluster's rates over its seconds, and minus `snaps` extra meter readings."""
    return {**d, **{k: d[k] - idle["rate"][k] * d["seconds"] - snaps * idle["snap"][k]
                    for k in ("commands", "net_in", "net_out", "redis_cpu", "workers_cpu")}}


def top_commands(before: dict[str, float], after: dict[str, float], count: int = 8) -> dict[str, float]:
    """Share of Redis's command time by command, in %."""
    spent = {k: after[k] - before.get(k, 0.0) for k in after}
    total = sum(spent.values()) or 1.0
    return {k: round(100 * v / total, 1) for k, v in sorted(spent.items(), key=lambda kv: -kv[1])[:count] if v > 0}


# --- 1. idle ------------------------------------------------------------------------------------


def measure_idle(meter: Meter, seconds: float) -> dict[str, Any]:
    snaps = [meter.snap() for _ in range(6)]  # what one reading costs
    snap = {k: (snaps[-1][k] - snaps[0][k]) / 5 for k in COUNTERS}
    usec0 = meter.usec_by_command()
    a = meter.snap()
    time.sleep(seconds)
    d = delta(a, meter.snap())
    rate = {k: (d[k] - snap[k]) / d["seconds"] for k in COUNTERS}
    return {"seconds": d["seconds"], "rate": rate, "snap": snap, "nodes": len(meter.nodes),
            "top_commands_pct": top_commands(usec0, meter.usec_by_command())}


# --- 2 and 3. throughput of many jobs -------------------------------------------------------------


def drive(meter: Meter, make: Callable[[], Job], in_flight: int, seconds: float, timeout_s: float = 300.0) -> dict[str, Any]:
    """Keep `in_flight` jobs going for `seconds`, then let the last ones finish, collecting each
    result and forgetting the job as a batch client does (`batch.POLL_S` when nothing moved)."""
    flying: list[tuple[Job, Any]] = []
    jobs = strips = 0
    usec0 = meter.usec_by_command()
    a = meter.snap()
    deadline = a["t"] + seconds
    while flying or time.monotonic() < deadline:
        busy = False
        while len(flying) < in_flight and time.monotonic() < deadline:
            job = make()
            flying.append((job, job.waiter(timeout_s, eager=True)))
            busy = True
        still = []
        for job, waiter in flying:
            if waiter.step() is None:
                still.append((job, waiter))
                continue
            job.forget()
            jobs += 1
            strips += job.strip_count
            busy = True
        flying = still
        if not busy:
            time.sleep(batch.POLL_S)
    d = delta(a, meter.snap())
    return {"jobs": jobs, "strips": strips, "in_flight": in_flight, "raw": d,
            "top_commands_pct": top_commands(usec0, meter.usec_by_command())}


def rates(run: dict[str, Any], idle: dict[str, Any]) -> dict[str, Any]:
    d = run["raw"]
    load = less_background(d, idle)
    s = d["seconds"]
    share = load["redis_cpu"] / s  # of one core
    return {
        **run, "load": load,
        "strips_per_s": run["strips"] / s, "jobs_per_s": run["jobs"] / s,
        "redis_cpu_share": share, "workers_cpu_share": d["workers_cpu"] / s, "client_cpu_share": d["client_cpu"] / s,
        "one_core_strips_per_s": run["strips"] / s / share, "one_core_jobs_per_s": run["jobs"] / s / share,
        "redis_us_per_job": load["redis_cpu"] / run["jobs"] * 1e6,
        "commands_per_job": load["commands"] / run["jobs"],
        "bytes_per_job": (load["net_in"] + load["net_out"]) / run["jobs"],
    }


def tiny_jobs(strips: int) -> Callable[[], Job]:
    """Jobs of `strips` gaussian strips of 8 rows x 64 pixels (with the 8-row halos, ~1.5 KB inline)."""
    image = np.random.default_rng(1).integers(0, 256, (8 * strips, 64), dtype=np.uint8)
    params = Params(op="gaussian", values={"sigma": 0.5}, strips=strips, codec=Codec.lossless).validate()
    return lambda: submit_pixels(image, params)


def claim_bytes(client: Any, job: Job) -> int:
    """Bytes a finished, uncollected job holds in claims (payloads and outputs)."""
    keys = claims.keys_of(job.id, job.strip_count, job.spec.fields)
    with client.pipeline(transaction=False) as pipe:
        for k in keys:
            pipe.strlen(k)
        return int(sum(pipe.execute()))


# --- 4. per operation and size --------------------------------------------------------------------


def one_machine(op: ops.Operation, image: np.ndarray, repeats: int) -> tuple[np.ndarray, list[float]]:
    """The operation on the whole prepared image, one thread: its output and CPU seconds per run."""
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        pixels, values = op.prepare(image), op.values({})
        seconds = []
        for _ in range(repeats):
            t0 = time.process_time()
            whole = op.apply(pixels, values)
            seconds.append(time.process_time() - t0)
            if seconds[0] > HEAVY_S:
                break
    finally:
        cv2.setNumThreads(threads)
    return whole, seconds


def one_job(meter: Meter, idle: dict[str, Any], image: np.ndarray, params: Params, whole: np.ndarray) -> dict[str, Any]:
    """One job alone, submit to collected and forgotten: its Redis traffic and its workers' CPU."""
    a = meter.snap()
    job = submit_pixels(image, params)
    result = job.wait(900, forget=False)
    exact = bool(np.array_equal(result.image, whole))
    b = meter.snap()
    held = claim_bytes(meter.client, job)  # between b and c: not the job's traffic
    c = meter.snap()
    job.forget()
    d = delta(c, meter.snap())
    ab = delta(a, b)
    load = less_background({k: ab[k] + d[k] for k in ab}, idle, snaps=1)  # c's reading is not the job's
    return {
        "strips": job.strip_count, "exact": exact, "wall_s": result.wall_s, "claim_bytes_held": held,
        "used_memory_delta": b["memory"] - a["memory"],
        "commands": load["commands"], "net_in": load["net_in"], "net_out": load["net_out"],
        "redis_cpu_s": load["redis_cpu"], "workers_cpu_s": load["workers_cpu"],
        "strip_task_s": sum(result.stages.worker_seconds.values()),
    }


def measure_case(meter: Meter, idle: dict[str, Any], name: str, size: str, repeats: int, codec: Codec) -> dict[str, Any]:
    width, height = SIZES[size]
    op = ops.get(name)
    image = photo_like(width, height)
    if name == "denoise":
        image = noisy(image)
    whole, base = one_machine(op, image, repeats)
    runs = 1 if base[0] > HEAVY_S else repeats
    params = Params(op=name, codec=codec).validate()
    samples = [one_job(meter, idle, image, params, whole) for _ in range(runs)]
    med = {k: statistics.median(s[k] for s in samples) for k in samples[0] if k not in ("exact",)}
    return {"op": name, "size": size, "width": width, "height": height, "pixels": width * height,
            "one_machine_cpu_s": statistics.median(base), "one_machine_samples_s": base,
            "exact": all(s["exact"] for s in samples), "samples": samples, "median": med}


def derive(case: dict[str, Any], idle: dict[str, Any], model: dict[str, float]) -> dict[str, Any]:
    """What one Redis serves of this case: its commands and bytes at the per-command and per-MB CPU
    of a loaded Redis (`model`), the 10 GbE bound, and the worker cores the smaller rate takes."""
    m = case["median"]
    moved_mb = (m["net_in"] + m["net_out"]) / MB
    redis_s = m["commands"] * model["per_command_s"] + moved_mb * model["per_mb_s"]
    redis_rate = 1 / redis_s
    link_rate = LINK_BYTES_S / max(m["net_in"], m["net_out"])
    rate = min(redis_rate, link_rate)
    per_node = idle["rate"]["redis_cpu"] / idle["nodes"]  # the share of a Redis core an idle worker node costs
    worker_s = m["workers_cpu_s"]
    return {
        "redis_ms_per_job_loaded": redis_s * 1000,
        "redis_ms_per_job_alone": m["redis_cpu_s"] * 1000,
        "jobs_per_s_one_redis_core": redis_rate,
        "jobs_per_s_alone_one_redis_core": 1 / max(m["redis_cpu_s"], 1e-6),
        "jobs_per_s_10gbe": link_rate,
        "jobs_per_s": rate,
        "limit": "Redis CPU" if redis_rate <= link_rate else "10 GbE",
        "worker_cpu_s_per_job": worker_s,
        "cores_at_rate": rate * worker_s,
        "cores_at_rate_one_machine_cpu": rate * case["one_machine_cpu_s"],
        # with one 1-process node per core, each node's beats take a share of the same Redis core
        "jobs_per_s_counting_1_core_nodes": 1 / (redis_s + worker_s * per_node),
        "claim_mb_held_per_job": m["claim_bytes_held"] / MB,
    }


# --- report ---------------------------------------------------------------------------------------


def print_report(r: dict[str, Any]) -> None:
    idle = r["idle"]
    print(f"\nidle cluster ({idle['nodes']} worker nodes): Redis CPU {idle['rate']['redis_cpu'] * 1000:.2f} ms/s, "
          f"{idle['rate']['commands']:.0f} commands/s, {idle['rate']['net_in'] / 1000:.1f} KB/s in, "
          f"{idle['rate']['net_out'] / 1000:.1f} KB/s out; workers' CPU {idle['rate']['workers_cpu'] * 1000:.0f} ms/s; "
          f"Redis's command time: {idle['top_commands_pct']}")
    print("\nmessages: tiny gaussian strips (inline), one client keeping jobs in flight")
    print(f"{'jobs of':>9s} {'in flight':>9s} {'strips/s':>9s} {'joins/s':>8s} {'Redis CPU':>9s} {'workers':>8s} {'client':>7s} "
          f"{'1 core: strips/s':>16s} {'joins/s':>8s} {'us/job':>7s} {'cmds/job':>8s} {'KB/job':>7s}")
    for run in r["messages"].values():
        s = run["strips"] // max(1, run["jobs"])
        print(f"{s:>3d} strip{'s' if s > 1 else ' '} {run['in_flight']:>9d} {run['strips_per_s']:9.0f} {run['jobs_per_s']:8.0f} "
              f"{run['redis_cpu_share'] * 100:8.0f}% {run['workers_cpu_share'] * 100:7.0f}% {run['client_cpu_share'] * 100:6.0f}% "
              f"{run['one_core_strips_per_s']:16.0f} {run['one_core_jobs_per_s']:8.0f} {run['redis_us_per_job']:7.0f} "
              f"{run['commands_per_job']:8.0f} {run['bytes_per_job'] / 1000:7.1f}")
    mod = r["model"]
    print(f"Redis CPU per strip message {mod['per_strip_s'] * 1e6:.0f} us, per job beyond its strips (record, stitch, "
          f"polls, forget) {mod['per_job_s'] * 1e6:.0f} us: in long jobs one core carries ~{1 / mod['per_strip_s']:.0f} "
          f"strip messages/s; per command {mod['per_command_s'] * 1e6:.1f} us, per MB moved {mod['per_mb_s'] * 1e6:.0f} us "
          f"(1-strip jobs predicted from these {mod['check_1_strip_us_per_job']['predicted']:.0f} us, "
          f"measured {mod['check_1_strip_us_per_job']['measured']:.0f} us)")
    for k, run in r["messages"].items():
        print(f"  where Redis's command time went ({k}): {run['top_commands_pct']}")
    c = r["claims"]
    print(f"\nclaims: {c['strips_per_job']} strips of {c['claim_mb_per_job'] / c['strips_per_job'] / 2:.2f} MB in and out per job, "
          f"{c['in_flight']} in flight: {c['claim_mb_per_s']:.0f} MB/s of claims ({c['net_in_mb_per_s']:.0f} MB/s into Redis, "
          f"{c['net_out_mb_per_s']:.0f} MB/s out), Redis CPU {c['redis_cpu_share'] * 100:.0f}%, workers {c['workers_cpu_share'] * 100:.0f}%, "
          f"client {c['client_cpu_share'] * 100:.0f}%; one core: ~{c['one_core_claim_mb_per_s']:.0f} MB/s of claims, "
          f"~{c['one_core_moved_mb_per_s']:.0f} MB/s in + out")
    print(f"  where Redis's command time went: {c['top_commands_pct']}")
    print(f"\nper job ({r['codec']}, medians, Redis figures less the idle cluster's): what one Redis core serves, "
          "at a loaded Redis's CPU per command and per MB")
    print(f"{'op':9s} {'size':>5s} {'strips':>6s} {'cmds':>5s} {'MB in':>6s} {'MB out':>6s} {'held':>5s} {'Redis ms':>8s} "
          f"{'alone':>6s} {'CPU s':>6s} {'workers':>7s} {'jobs/s':>7s} {'10GbE':>6s} {'cores':>6s} {'limit':>9s} exact")
    for case in r["cases"]:
        m, d = case["median"], case["derived"]
        print(f"{case['op']:9s} {case['size']:>5s} {m['strips']:6.0f} {m['commands']:5.0f} {m['net_in'] / MB:6.1f} "
              f"{m['net_out'] / MB:6.1f} {m['claim_bytes_held'] / MB:5.1f} {d['redis_ms_per_job_loaded']:8.2f} "
              f"{d['redis_ms_per_job_alone']:6.2f} {case['one_machine_cpu_s']:6.2f} {m['workers_cpu_s']:7.2f} "
              f"{d['jobs_per_s_one_redis_core']:7.0f} {d['jobs_per_s_10gbe']:6.0f} {d['cores_at_rate']:6.0f} "
              f"{d['limit']:>9s} {case['exact']}")
    print("held: MB of claims a job holds until collected; Redis ms: its commands and bytes at the loaded rates (alone: "
          "measured with Redis otherwise idle); CPU s: the operation on the whole image, one thread; workers: CPU the "
          "worker processes spent on the job; jobs/s: 1 / Redis ms; cores: workers x the smaller of jobs/s and 10GbE")
    print(f"\nJSON: {r['json']}")


def _git(*args: str) -> str:
    """The tree measured (other changes may be in progress beside this script)."""
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 s windows, 1 and 8 MP, one repeat")
    parser.add_argument("--window", type=float, help="seconds per throughput run (default 15; --quick 5)")
    parser.add_argument("--repeats", type=int, help="jobs per case below HEAVY_S (default 5; --quick 1)")
    parser.add_argument("--op", action="append", choices=OPS, help="default: all four")
    parser.add_argument("--size", action="append", choices=list(SIZES), help="default: all (--quick: 1 and 8 MP)")
    parser.add_argument("--codec", choices=[c.value for c in Codec], default="lossless")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    window = args.window or (5.0 if args.quick else 15.0)
    repeats = args.repeats or (1 if args.quick else 5)
    sizes = args.size or (["1 MP", "8 MP"] if args.quick else list(SIZES))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    started = time.monotonic()
    report: dict[str, Any] = {
        "when": stamp, "codec": args.codec, "window_s": window, "repeats": repeats,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "opencv": cv2.__version__,
                    "load_before": os.getloadavg()},
        "git": {"head": _git("rev-parse", "HEAD"), "changed": _git("status", "--short").splitlines()},
    }
    tmp = tempfile.TemporaryDirectory(prefix="lg-cap-")
    folder = Path(tmp.name)
    redis = LocalRedis(folder, port=free_port())
    host = os.uname().nodename
    nodes = [LocalWorker(f"cap{i}@{host}", redis.url, 1, log_path=folder / f"cap{i}.log") for i in (1, 2)]
    try:
        redis.start()
        use_broker(redis.url)
        for node in nodes:
            node.start()
        wait_for_workers([n.name for n in nodes], [n.proc for n in nodes if n.proc])
        client = broker.client(redis.url)
        report["redis"] = {"version": client.info("server")["redis_version"], "binary": redis_server_binary(), "url": redis.url}
        meter = Meter(client, nodes)
        for make in (tiny_jobs(32), tiny_jobs(1)):  # warm up: imports and first connections in the workers
            for _ in range(3):
                make().wait(60)
        time.sleep(2)
        idle = report["idle"] = measure_idle(meter, 4.0 if args.quick else 8.0)
        print(f"idle measured ({time.monotonic() - started:.0f} s)", flush=True)

        report["messages"] = {
            "32 strips a job": rates(drive(meter, tiny_jobs(32), 4, window), idle),
            "1 strip a job": rates(drive(meter, tiny_jobs(1), 16, window), idle),
        }
        r32, r1 = report["messages"]["32 strips a job"], report["messages"]["1 strip a job"]
        per_strip = (r32["redis_us_per_job"] - r1["redis_us_per_job"]) / 31 / 1e6
        model = {"per_strip_s": per_strip, "per_job_s": r1["redis_us_per_job"] / 1e6 - per_strip}
        print(f"messages measured ({time.monotonic() - started:.0f} s)", flush=True)

        noise = np.random.default_rng(2).integers(0, 256, (2048, 4096), dtype=np.uint8)
        big = Params(op="gaussian", values={"sigma": 0.5}, strips=8, codec=Codec.lossless).validate()
        probe = submit_pixels(noise, big)
        probe.wait(120, forget=False)
        per_job_claims = claim_bytes(client, probe)
        probe.forget()
        run = rates(drive(meter, lambda: submit_pixels(noise, big), 4, window), idle)
        s = run["raw"]["seconds"]
        claim_mb = per_job_claims * run["jobs"] / MB
        # Redis CPU per MB through it (in or out), net of the per-strip and per-job message costs
        moved_mb = (run["load"]["net_in"] + run["load"]["net_out"]) / MB
        # Redis CPU = commands x per command + MB moved x per MB, from the 32-strip and the claims run
        runs = [r32["load"], run["load"]]
        lhs = np.array([[x["commands"], (x["net_in"] + x["net_out"]) / MB] for x in runs])
        per_command, per_mb = np.linalg.solve(lhs, np.array([x["redis_cpu"] for x in runs]))
        model.update(per_command_s=float(per_command), per_mb_s=float(per_mb))
        one = r1["load"]
        model["check_1_strip_us_per_job"] = {  # the third run, predicted from the two
            "measured": r1["redis_us_per_job"],
            "predicted": (one["commands"] * per_command + (one["net_in"] + one["net_out"]) / MB * per_mb) / r1["jobs"] * 1e6}
        report["claims"] = {
            **run, "strips_per_job": 8, "claim_mb_per_job": per_job_claims / MB, "claim_mb_per_s": claim_mb / s,
            "net_in_mb_per_s": run["load"]["net_in"] / MB / s, "net_out_mb_per_s": run["load"]["net_out"] / MB / s,
            "one_core_claim_mb_per_s": claim_mb / s / run["redis_cpu_share"],
            "one_core_moved_mb_per_s": moved_mb / s / run["redis_cpu_share"],
        }
        report["model"] = model
        print(f"claims measured ({time.monotonic() - started:.0f} s)", flush=True)

        cases = []
        for name in args.op or OPS:
            for size in sizes:
                case = measure_case(meter, idle, name, size, repeats, Codec(args.codec))
                case["derived"] = derive(case, idle, model)
                cases.append(case)
                print(f"{name} {size}: {case['median']['redis_cpu_s'] * 1000:.2f} Redis ms, "
                      f"{case['median']['workers_cpu_s']:.2f} worker s, exact {case['exact']} "
                      f"({time.monotonic() - started:.0f} s)", flush=True)
        report["cases"] = cases
        report["worker_logs"] = {n.name: n.log_path.read_text(errors="replace")[-2000:] for n in nodes}
    finally:
        for node in nodes:
            node.stop()
        redis.stop()
        tmp.cleanup()
    report["machine"]["load_after"] = os.getloadavg()
    report["total_s"] = time.monotonic() - started
    args.out.mkdir(parents=True, exist_ok=True)
    report["json"] = str(args.out / f"capacity-{stamp}.json")
    Path(report["json"]).write_text(json.dumps(report, indent=2, default=str))
    print_report(report)
    print(f"total {report['total_s']:.0f} s; load average before {report['machine']['load_before']}, "
          f"after {report['machine']['load_after']}")


if __name__ == "__main__":
    main()
