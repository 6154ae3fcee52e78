"""Seconds from scale(2) to 2 workers connected: through aifab (the widget's Scale button on
``aifab.cluster()``) vs a bare ``dask_jobqueue.SLURMCluster`` with the same job size, on the
same real single-node Slurm, alternating, median of N.

    .venv/bin/python -m benchmarks.cluster_scale [--runs 5]

Last line: {"bench": "cluster_scale", "bare_s": .., "aifab_s": .., "ratio": .., ...}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from aifab.magics.dask_cluster import wait_for_workers
from tests.harness.slurm import SlurmCluster, gh200_cluster

JOB = {"cores": 1, "memory": "1GiB", "walltime": "00:30:00"}


def _gone(slurm: SlurmCluster, timeout: float = 60) -> None:
    slurm.wait_for(lambda: not [r for r in slurm.squeue() if r["state"] != "COMPLETING"],
                   timeout, interval=0.1, what="an empty queue between runs")


def bare_once(slurm: SlurmCluster) -> float:
    from dask_jobqueue import SLURMCluster

    with SLURMCluster(queue="debug", interface="lo", scheduler_options={
            "dashboard_address": "127.0.0.1:0"}, **JOB) as cluster:
        t0 = time.perf_counter()
        cluster.scale(2)
        wait_for_workers(cluster, 2)
        elapsed = time.perf_counter() - t0
    _gone(slurm)
    return elapsed


def aifab_once(slurm: SlurmCluster) -> float:
    import aifab

    with aifab.cluster(**JOB) as cluster:
        widget = cluster._widget()
        widget.scale_input.value = 2
        t0 = time.perf_counter()
        widget.scale_button.click()
        wait_for_workers(cluster, 2)
        elapsed = time.perf_counter() - t0
        widget.close()
    _gone(slurm)
    return elapsed


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)
    os.environ.update({"AIFAB_BACKEND": "slurm", "AIFAB_SLURM_PARTITION": "debug",
                       "AIFAB_DASK_INTERFACE": "lo",
                       "AIFAB_WALLTIME_END": str(int(time.time()) + 3 * 3600)})
    root = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    root.chmod(0o755)
    slurm = gh200_cluster(root / "slurm", partitions=("debug",))
    slurm.start()
    bare, ours = [], []
    try:
        bare_once(slurm)  # warm-up: imports, page cache
        for _ in range(args.runs):
            bare.append(bare_once(slurm))
            ours.append(aifab_once(slurm))
            print(f"bare {bare[-1]:.2f} s  aifab {ours[-1]:.2f} s", flush=True)
    finally:
        slurm.stop()
    b, a = statistics.median(bare), statistics.median(ours)
    print(json.dumps({"bench": "cluster_scale", "bare_s": round(b, 3), "aifab_s": round(a, 3),
                      "ratio": round(a / b, 3), "runs": args.runs,
                      "bare_all": [round(x, 2) for x in bare],
                      "aifab_all": [round(x, 2) for x in ours]}))


if __name__ == "__main__":
    main()
