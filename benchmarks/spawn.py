"""POST → ready of a Slurm session: plain batchspawner.SlurmSpawner vs aifab's
PlacementSpawner on the same profile, through the same real hub and Slurm, alternating.

    .venv/bin/python -m benchmarks.spawn [--runs 10] [--inflight 20]

Last line: {"bench": "spawn", "baseline_s": .., "aifab_s": .., "ratio": .., ...}
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.harness.hub import Hub
from tests.harness.slurm import SlurmCluster, gh200_cluster
from tests.slurm_hub import SITE_CONFIG, TEST_OVERRIDES, create_hub_user, ensure_unix_user

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
# The same resources for both: one GH200 GPU, 16 cores, 64 GiB, one hour, partition gh200.
BASELINE_CONFIG = f"""
c.JupyterHub.spawner_class = 'benchmarks.alternating_spawner.AlternatingSpawner'
c.BaselineSlurmSpawner.cmd = [{str(BIN / 'jupyterhub-singleuser')!r}]
c.BaselineSlurmSpawner.batchspawner_singleuser_cmd = {str(BIN / 'batchspawner-singleuser')!r}
c.BaselineSlurmSpawner.req_partition = 'gh200'
c.BaselineSlurmSpawner.req_gres = 'gpu:gh200:1'
c.BaselineSlurmSpawner.req_nprocs = '16'
c.BaselineSlurmSpawner.req_memory = '64G'
c.BaselineSlurmSpawner.req_runtime = '01:00:00'
c.BaselineSlurmSpawner.start_timeout = 120
"""
AIFAB_OPTIONS = {"profile": "gh200", "gpus": 1, "cpus": 16, "memory_gb": 64,
                 "walltime": "01:00:00"}


def spawn_once(hub: Hub, user: str, options: dict | None) -> float:
    t0 = time.perf_counter()
    r = hub.api("POST", f"/users/{user}/server", json=options, timeout=120)
    if r.status_code == 201:  # the hub answers when the server is ready (within 10 s)
        return time.perf_counter() - t0
    if r.status_code != 202:
        raise RuntimeError(f"spawn of {user}: {r.status_code} {r.text}\n{hub.log_tail()}")
    while not hub.user_model(user)["servers"].get("", {}).get("ready"):
        if time.perf_counter() - t0 > 120:
            raise RuntimeError(f"{user} not ready after 120 s\n{hub.log_tail()}")
        time.sleep(0.1)
    return time.perf_counter() - t0


def stop(hub: Hub, slurm: SlurmCluster, user: str) -> None:
    hub.api("DELETE", f"/users/{user}/server")
    hub.wait_for_stopped(user, timeout=60)
    slurm.wait_for(lambda: not slurm.squeue("-u", user), 30, what=f"{user}'s job gone")


def api_latency_while_spawning(hub: Hub, slurm: SlurmCluster, n: int) -> dict:
    users = [f"bench-{i:02d}" for i in range(n)]
    for u in users:
        ensure_unix_user(u)
        create_hub_user(hub, u)
    options = {"profile": "gh200", "gpus": 0, "cpus": 1, "memory_gb": 4}
    threads = [threading.Thread(target=hub.api, args=("POST", f"/users/{u}/server"),
                                kwargs={"json": options, "timeout": 120}) for u in users]
    for t in threads:
        t.start()
    latencies = []
    t_end = time.monotonic() + 60
    while time.monotonic() < t_end:
        t0 = time.perf_counter()
        hub.api("GET", "/users/base-bench")
        latencies.append(time.perf_counter() - t0)
        models = [hub.user_model(u)["servers"].get("", {}) for u in users]
        if all(m.get("ready") for m in models):
            break
        time.sleep(0.05)
    ready = sum(bool(hub.user_model(u)["servers"].get("", {}).get("ready")) for u in users)
    for t in threads:
        t.join(5)
    for u in users:
        hub.api("DELETE", f"/users/{u}/server")
    for u in users:
        hub.wait_for_stopped(u, timeout=60)
    return {"api_p50_ms": round(statistics.median(latencies) * 1000, 1),
            "api_p95_ms": round(sorted(latencies)[int(len(latencies) * 0.95)] * 1000, 1),
            "inflight": n, "inflight_ready": ready}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=10, help="spawns of each kind")
    ap.add_argument("--inflight", type=int, default=20, help="concurrent spawns for latency")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="aifab-bench-"))
    root.chmod(0o755)
    slurm = gh200_cluster(root / "slurm")
    slurm.start()
    hub = Hub(root / "hub", config_file=SITE_CONFIG,
              extra_config=TEST_OVERRIDES + BASELINE_CONFIG,
              env={"PYTHONPATH": str(REPO)})  # so the hub can import the shim above
    (root / "hub").chmod(0o755)
    results: dict[str, list[float]] = {"baseline": [], "aifab": []}
    try:
        hub.start()
        for name in ("base-bench", "aifab-bench"):
            ensure_unix_user(name)
            create_hub_user(hub, name)
        for i in range(args.runs):
            order = [("baseline", "base-bench", None), ("aifab", "aifab-bench", AIFAB_OPTIONS)]
            for kind, user, options in (order if i % 2 == 0 else order[::-1]):
                results[kind].append(spawn_once(hub, user, options))
                stop(hub, slurm, user)
            print(f"run {i + 1}: baseline {results['baseline'][-1]:.2f}s "
                  f"aifab {results['aifab'][-1]:.2f}s", file=sys.stderr)
        latency = api_latency_while_spawning(hub, slurm, args.inflight) if args.inflight else {}
    finally:
        hub.stop()
        slurm.stop()
        subprocess.run(["rm", "-rf", str(root)], check=False)
    base, aifab = statistics.median(results["baseline"]), statistics.median(results["aifab"])
    print(json.dumps({"bench": "spawn", "baseline_s": round(base, 3), "aifab_s": round(aifab, 3),
                      "ratio": round(aifab / base, 3), "runs": args.runs,
                      "baseline_all": [round(x, 2) for x in results["baseline"]],
                      "aifab_all": [round(x, 2) for x in results["aifab"]], **latency}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
