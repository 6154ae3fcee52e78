"""Records per second of ``aifab.data.prepare`` in this process and on 1 and 2 dask workers of
``aifab.cluster()`` on a real single-node Slurm (tiny offline model, chat records).

    .venv/bin/python -m benchmarks.prepare [--records 20000] [--runs 2]

Last line: {"bench": "prepare", "single_rps": .., "workers_1_rps": .., "workers_2_rps": .., ...}
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from tests.harness.slurm import gh200_cluster

REPO = Path(__file__).resolve().parent.parent


def write_records(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"messages": [
                {"role": "system", "content": "You answer arithmetic questions briefly."},
                {"role": "user", "content": f"What is {i} plus {i * 7}? Show the sum."},
                {"role": "assistant", "content": f"{i} plus {i * 7} is {i * 8}."}]}) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args(argv)
    import aifab
    from aifab.magics.dask_cluster import wait_for_workers
    from aifab.magics.data import prepare
    from aifab.magics.tiny_model import build_cached

    model = build_cached(Path(os.environ.get("AIFAB_TEST_CACHE", REPO / ".cache")) /
                         "tiny-model")
    os.environ.update({"AIFAB_BACKEND": "slurm", "AIFAB_SLURM_PARTITION": "debug",
                       "AIFAB_DASK_INTERFACE": "lo",
                       "AIFAB_WALLTIME_END": str(int(time.time()) + 3 * 3600)})
    root = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    root.chmod(0o755)
    src = root / "records.jsonl"
    write_records(src, args.records)
    slurm = gh200_cluster(root / "slurm", partitions=("debug",))
    slurm.start()
    rates: dict[str, list[float]] = {"single": [], "workers_1": [], "workers_2": []}

    def once(key: str, cluster) -> None:
        out = root / f"out-{key}"
        shutil.rmtree(out, ignore_errors=True)
        r = prepare(src, model, out, seq_len=512, chunk_records=1000, cluster=cluster)
        rates[key].append(r.records_per_second)
        print(f"{key}: {r.records_per_second:.0f} records/s ({r.seconds:.1f} s)", flush=True)

    try:
        for _ in range(args.runs):
            once("single", None)
            for n in (1, 2):
                with aifab.cluster(workers=n, cores=1, memory="2GiB") as cluster:
                    wait_for_workers(cluster, n)
                    once(f"workers_{n}", cluster)
    finally:
        slurm.stop()
        shutil.rmtree(root, ignore_errors=True)
    med = {k: round(statistics.median(v)) for k, v in rates.items()}
    print(json.dumps({"bench": "prepare", "records": args.records,
                      "single_rps": med["single"], "workers_1_rps": med["workers_1"],
                      "workers_2_rps": med["workers_2"],
                      "speedup_2_vs_1": round(med["workers_2"] / med["workers_1"], 2),
                      "runs": args.runs, "cores_here": os.cpu_count()}))


if __name__ == "__main__":
    main()
