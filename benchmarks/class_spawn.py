"""A class of N pressing Start at once on the real Slurm: aifab's PlacementSpawner (one shared
squeue per round, the start line) vs plain batchspawner.SlurmSpawner, through one real hub.

    .venv/bin/python -m benchmarks.class_spawn [--users 50] [--hold 60] [--concurrent-starts 10]

Both run tests/tiny_singleuser.py as the single-user server, so what is measured is the hub
and Slurm, not N Jupyter servers on two cores. For each spawner: all N start at once
(POST -> ready per user; the hub API's latency meanwhile, from a probe every 50 ms), then
all N are held running for --hold seconds while the hub polls them as it always does
(Spawner.poll_interval, 30 s), and slurmctld's own count of job queries (sdiag) gives the
squeue calls per minute; then all stop.

Last line: {"bench": "class_spawn", "failures", "spawn_p50_s", "spawn_p95_s", "api_p95_ms",
"squeue_per_min", "baseline_squeue_per_min", "baseline_spawn_p95_s", ...}
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from aifab.spawners.loadtest import hub_metrics
from benchmarks.spawn import BASELINE_CONFIG
from tests.harness.hub import Hub
from tests.harness.slurm import SlurmCluster, gh200_cluster
from tests.slurm_hub import SITE_CONFIG, TEST_OVERRIDES, create_class, create_hub_user

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "tiny_singleuser.py"
AIFAB_OPTIONS = {"profile": "gh200", "gpus": 0, "cpus": 1, "memory_gb": 4,
                 "walltime": "01:00:00"}


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


def job_queries(slurm: SlurmCluster) -> int:
    out = slurm.run("sdiag").stdout
    return sum(int(n) for n in re.findall(r"^\s*REQUEST_JOB_INFO\w*\s+\(\s*\d+\)\s+count:(\d+)",
                                          out, re.M))


def hub_cpu(hub: Hub) -> float:
    """The hub process's CPU seconds so far (its own Prometheus metrics)."""
    return hub_metrics(hub.url, hub.token).get("process_cpu_seconds_total", 0.0)


def class_start(hub: Hub, users: list[str], options: dict | None, timeout: float) -> dict:
    spawn: dict[str, float] = {}
    errors: dict[str, str] = {}
    go = threading.Barrier(len(users) + 1)

    def one(user: str) -> None:
        go.wait()
        t0 = time.perf_counter()
        try:
            r = hub.api("POST", f"/users/{user}/server", json=options, timeout=120)
            if r.status_code not in (201, 202):
                errors[user] = f"HTTP {r.status_code} {r.text[:200]}"
                return
            while time.perf_counter() - t0 < timeout:
                model = hub.user_model(user)
                if model["servers"].get("", {}).get("ready"):
                    spawn[user] = time.perf_counter() - t0
                    return
                if not model["servers"] and not model.get("pending"):
                    errors[user] = "the start failed"
                    return
                time.sleep(1.0)  # a spawn page follows its progress; it does not hammer
            errors[user] = f"not ready after {timeout:.0f} s"
        except Exception as exc:  # reported, the others go on
            errors[user] = repr(exc)

    threads = [threading.Thread(target=one, args=(u,)) for u in users]
    for t in threads:
        t.start()
    go.wait()
    latencies = []
    while any(t.is_alive() for t in threads):
        t0 = time.perf_counter()
        hub.api("GET", "/users/probe")
        latencies.append(time.perf_counter() - t0)
        time.sleep(0.05)
    return {"spawn": list(spawn.values()), "errors": errors, "api": latencies}


def hold(slurm: SlurmCluster, seconds: float) -> float:
    """squeue calls per minute slurmctld served while the class's sessions run."""
    before, t0 = job_queries(slurm), time.monotonic()
    time.sleep(seconds)
    return (job_queries(slurm) - before) * 60 / (time.monotonic() - t0)


def stop_class(hub: Hub, slurm: SlurmCluster, users: list[str]) -> None:
    for u in users:
        hub.api("DELETE", f"/users/{u}/server", timeout=120)
    for u in users:
        hub.wait_for_stopped(u, timeout=120)
    names = {f"aifab-{u}" for u in users} | {"jupyterhub-spawner"}
    slurm.wait_for(lambda: not [r for r in slurm.squeue() if r["name"] in names], 120,
                   what="the class's jobs gone")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--users", type=int, default=50)
    ap.add_argument("--hold", type=float, default=60, help="seconds all run, polled")
    ap.add_argument("--concurrent-starts", type=int, default=10,
                    help="PlacementSpawner.concurrent_starts (the workshop recipe's value)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds for one start")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="aifab-class-bench-"))
    root.chmod(0o755)
    slurm = gh200_cluster(root / "slurm")
    slurm.start()
    tiny = f"""
c.SlurmSessionSpawner.cmd = [{str(TINY)!r}]
c.BaselineSlurmSpawner.cmd = [{str(TINY)!r}]
c.BaselineSlurmSpawner.req_nprocs = '1'
c.BaselineSlurmSpawner.req_memory = '4G'
c.BaselineSlurmSpawner.req_gres = ''
c.BaselineSlurmSpawner.start_timeout = {int(args.timeout)}
c.SlurmSessionSpawner.start_timeout = {int(args.timeout)}
c.PlacementSpawner.concurrent_starts = {args.concurrent_starts}
c.JupyterHub.concurrent_spawn_limit = {max(100, 2 * args.users)}
"""
    hub = Hub(root / "hub", config_file=SITE_CONFIG,
              extra_config=TEST_OVERRIDES + BASELINE_CONFIG + tiny,
              env={"PYTHONPATH": str(REPO)})
    (root / "hub").chmod(0o755)
    results = {}
    try:
        hub.start()
        create_hub_user(hub, "probe")
        for kind, prefix, options in (("baseline", "base-", None),
                                      ("aifab", "cls-", AIFAB_OPTIONS)):
            users = create_class(hub, prefix, args.users)
            queries, cpu = job_queries(slurm), hub_cpu(hub)
            started = class_start(hub, users, options, args.timeout)
            started["start_squeue"] = job_queries(slurm) - queries
            started["hub_cpu"] = hub_cpu(hub) - cpu
            started["squeue_per_min"] = hold(slurm, args.hold)
            stop_class(hub, slurm, users)
            results[kind] = started
            print(f"{kind}: {len(started['spawn'])}/{args.users} ready, "
                  f"{started['squeue_per_min']:.1f} squeue/min held", file=sys.stderr)
    finally:
        hub.stop()
        slurm.stop()
        subprocess.run(["rm", "-rf", str(root)], check=False)
    a, b = results["aifab"], results["baseline"]
    report = {
        "bench": "class_spawn", "users": args.users, "concurrent_starts": args.concurrent_starts,
        "failures": len(a["errors"]),
        "spawn_p50_s": round(statistics.median(a["spawn"]), 2) if a["spawn"] else None,
        "spawn_p95_s": round(p95(a["spawn"]), 2) if a["spawn"] else None,
        "api_p50_ms": round(statistics.median(a["api"]) * 1000, 1),
        "api_p95_ms": round(p95(a["api"]) * 1000, 1),
        "squeue_per_min": round(a["squeue_per_min"], 1),
        "start_squeue_calls": a["start_squeue"],
        "start_hub_cpu_s": round(a["hub_cpu"], 1),
        "baseline_failures": len(b["errors"]),
        "baseline_spawn_p50_s": round(statistics.median(b["spawn"]), 2) if b["spawn"] else None,
        "baseline_spawn_p95_s": round(p95(b["spawn"]), 2) if b["spawn"] else None,
        "baseline_api_p95_ms": round(p95(b["api"]) * 1000, 1),
        "baseline_squeue_per_min": round(b["squeue_per_min"], 1),
        "baseline_start_squeue_calls": b["start_squeue"],
        "baseline_start_hub_cpu_s": round(b["hub_cpu"], 1),
        "errors": [f"{u}: {e}" for u, e in list(a["errors"].items())[:5]],
    }
    report["squeue_ratio"] = (round(report["baseline_squeue_per_min"] / report["squeue_per_min"], 1)
                              if report["squeue_per_min"] else None)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
