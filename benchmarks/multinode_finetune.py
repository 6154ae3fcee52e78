"""The tiny model fine-tuned on 2 nodes vs 1 node, the same global batch, on the tests' Slurm
of two nodes (tests/harness/slurm_nodes.py: each slurmd in namespaces of its own). Needs root.

    .venv/bin/python -m benchmarks.multinode_finetune [--steps 40] [--repeat 1] [--threads N]

One session holds one allocation of both nodes; each round runs ``%finetune --on`` it (REST
form) once with ``nodes=1`` (batch 8 on one rank) and once with ``nodes=2`` (batch 4 on each
of two ranks, one torchrun per node, c10d rendezvous on the first node). The figure is the
Trainer's own tokens/s over ``train()`` (tokens summed over the ranks). On CPUs that share one
machine this measures what two nodes cost (rendezvous, gloo all-reduce over the nodes'
network, two processes on 2 cores), not a speed-up. Both "nodes" share this machine's
cores: ``--threads 1`` (OMP_NUM_THREADS for every rank) gives each rank one core, as one core
per node would, so that the figure is the cost of the second node and not the two ranks'
threads fighting over the same cores.

Last line: {"bench": "multinode_finetune", "one_node_tokens_per_s", "two_nodes_tokens_per_s",
"ratio" (two / one), "steps", "global_batch", "repeat", "threads"}
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from aifab.allocation import allowances_to_env
from aifab.magics.tiny_model import build_cached
from tests.harness.jupyter import JupyterServer
from tests.harness.slurm_nodes import NamespacedCluster
from tests.test_multinode import MULTI, PAIR

GLOBAL_BATCH = 8


def one_run(server: JupyterServer, root: Path, model: Path, data: Path, nodes: int,
            steps: int, name: str) -> float:
    out = root / name
    r = server.request("POST", "aifab/api/services", json={
        "kind": "finetune", "name": name, "model": str(model), "data": str(data),
        "max_steps": steps, "save_steps": 10_000, "seq_len": 64, "lr": 1e-3,
        "batch_size": GLOBAL_BATCH // nodes, "on": "pair", "nodes": nodes,
        "output": str(out)})
    if r.status_code != 201:
        raise RuntimeError(f"{name}: {r.status_code} {r.text}")
    deadline = time.monotonic() + 600
    while (info := server.get(f"aifab/api/services/{name}").json())["status"] == "starting":
        if time.monotonic() > deadline:
            raise TimeoutError(info)
        time.sleep(0.5)
    if info["status"] != "finished":
        raise RuntimeError(f"{name}: {info}")
    done = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"event": "done"' in line][-1]
    return done["train_tokens_per_second"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of each rank")
    args = p.parse_args()
    from aifab.magics.examples import write_ping_pong

    root = Path(tempfile.mkdtemp(prefix="bench-multinode-"))
    root.chmod(0o755)
    model = build_cached(Path(".cache").resolve() / "tiny-model")
    data = write_ping_pong(root / "ping.jsonl")
    cluster = NamespacedCluster(root / "slurm", ctld_port=6837, subnet="10.213.8")
    cluster.start()
    rates: dict[int, list[float]] = {1: [], 2: []}
    try:
        env = {"AIFAB_BACKEND": "local", "AIFAB_ALLOCATABLE": allowances_to_env([MULTI]),
               "JUPYTERHUB_USER": "bench", "JUPYTERHUB_SERVER_NAME": "", **cluster.env}
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        with JupyterServer(root / "server", env=env) as server:
            server.request("POST", "aifab/api/allocations", json=PAIR).raise_for_status()
            deadline = time.monotonic() + 60
            while server.get("aifab/api/allocations/pair").json()["state"] != "running":
                if time.monotonic() > deadline:
                    raise TimeoutError("the allocation did not start")
                time.sleep(0.25)
            for i in range(args.repeat):
                for nodes in (1, 2):
                    rates[nodes].append(one_run(server, root, model, data, nodes, args.steps,
                                                f"n{nodes}-{i}"))
            server.request("DELETE", "aifab/api/allocations/pair")
    finally:
        cluster.stop()
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    print(json.dumps({"bench": "multinode_finetune", "one_node_tokens_per_s": round(one, 1),
                      "two_nodes_tokens_per_s": round(two, 1), "ratio": round(two / one, 3),
                      "steps": args.steps, "global_batch": GLOBAL_BATCH,
                      "repeat": args.repeat, "threads": args.threads or None}))


if __name__ == "__main__":
    main()
