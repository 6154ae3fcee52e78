"""A kernel on an idle GPU node: from "start kernel" to the first execute_reply, on the real
Slurm of the tests (one node, fake GH200 GPUs). Needs root (slurmd).

    .venv/bin/python -m benchmarks.alloc_kernel [--repeat 3]

Three ways, each --repeat times, the median reported:

* ``aifab_cold``: JupyterLab's kernel REST API (``POST /api/kernels`` with the per-profile
  kernel spec) on a session that holds no allocation yet: the provisioner requests one
  (sbatch), waits for it, starts the kernel as an ``srun --overlap`` step with CurveZMQ keys;
  then one ``execute_request`` over the kernel's websocket. The allocation is released after
  each round, so every round starts on an idle node with no job.
* ``aifab_warm``: the same, the session's allocation already running (a second kernel, a
  restart after a crash): only the step and the kernel.
* ``anchor``: the closest plain way, run the same way: ``srun`` of ``ipykernel_launcher`` with a
  connection file written by jupyter_client, the same size of request, then one execute over
  a ``BlockingKernelClient`` (FZJ-JSC's jupyter-slurm-provisioner is not on PyPI).

Last line: {"bench": "alloc_kernel", "aifab_cold_s", "aifab_warm_s", "anchor_s",
"ratio_cold" (aifab_cold / anchor; goal <= 1.0), "ratio_warm", "repeat"}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jupyter_client import BlockingKernelClient
from jupyter_client.connect import write_connection_file

from aifab.spawners.loadtest import execute_content, kernel_channel
from tests.harness.jupyter import JupyterServer
from tests.harness.slurm import gh200_cluster
from tests.test_allocations import ENV, alloc_jobs

SPEC = "aifab-gh200"
ALLOCATION = "kernel-gh200"


def first_reply(server: JupyterServer) -> tuple[float, str]:
    """POST /api/kernels, then one execute over the websocket: (seconds, kernel id)."""
    t0 = time.perf_counter()
    r = server.request("POST", "api/kernels", json={"name": SPEC}, timeout=600)
    r.raise_for_status()
    kernel = r.json()["id"]

    async def execute() -> str:
        async with kernel_channel(server.url.rstrip("/"), kernel, server.token) as request:
            return await request("execute_request", execute_content("print(6 * 7)"),
                                 time.monotonic() + 120)

    out = asyncio.run(execute())
    elapsed = time.perf_counter() - t0
    assert out.strip() == "42", out
    return elapsed, kernel


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def anchor_round(slurm, tmp: Path, cpus: int, gpus: int) -> float:
    conn = tmp / f"anchor-{time.monotonic_ns()}.json"
    t0 = time.perf_counter()
    write_connection_file(str(conn), ip="127.0.0.1")
    proc = subprocess.Popen(
        ["srun", "-p", "gh200", "-N1", "-n1", f"--cpus-per-task={cpus}",
         f"--gres=gpu:gh200:{gpus}", "--mem=4G", "--time=10", "-J", "anchor-kernel",
         sys.executable, "-m", "ipykernel_launcher", "-f", str(conn)],
        env={**os.environ, **slurm.env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = BlockingKernelClient(connection_file=str(conn))
    client.load_connection_file()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=120)
        reply = client.execute_interactive("print(6 * 7)", timeout=60, output_hook=lambda m: None)
        elapsed = time.perf_counter() - t0
        assert reply["content"]["status"] == "ok", reply
    finally:
        client.stop_channels()
        proc.terminate()
        proc.wait(30)
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="aifab-alloc-kernel-"))
    root.chmod(0o755)
    slurm = gh200_cluster(root / "slurm")
    slurm.start()
    cold, warm, anchor = [], [], []
    try:
        server = JupyterServer(root / "server", env=ENV)
        server.start()
        try:
            spec = server.get("api/kernelspecs").json()["kernelspecs"][SPEC]["spec"]
            config = spec["metadata"]["kernel_provisioner"]["config"]
            for _ in range(args.repeat):
                seconds, kernel = first_reply(server)
                cold.append(seconds)
                # a second kernel in the allocation the first one made
                seconds, second = first_reply(server)
                warm.append(seconds)
                for k in (kernel, second):
                    server.request("DELETE", f"api/kernels/{k}")
                server.request("DELETE", f"aifab/api/allocations/{ALLOCATION}")
                wait_until(lambda: not alloc_jobs(slurm), 60, "the allocation released")
            request = server.get(f"aifab/api/allocations/{ALLOCATION}").json()["request"]
        finally:
            server.stop()
        for _ in range(args.repeat):
            anchor.append(anchor_round(slurm, root, int(request.get("cpus", 1)),
                                       int(config["gpus"])))
            wait_until(lambda: not slurm.squeue(), 60, "the anchor's job gone")
    finally:
        slurm.stop()
    report = {"bench": "alloc_kernel",
              "aifab_cold_s": round(statistics.median(cold), 2),
              "aifab_warm_s": round(statistics.median(warm), 2),
              "anchor_s": round(statistics.median(anchor), 2),
              "repeat": args.repeat}
    report["ratio_cold"] = round(report["aifab_cold_s"] / report["anchor_s"], 2)
    report["ratio_warm"] = round(report["aifab_warm_s"] / report["anchor_s"], 2)
    report["all"] = {"aifab_cold": [round(x, 2) for x in cold],
                     "aifab_warm": [round(x, 2) for x in warm],
                     "anchor": [round(x, 2) for x in anchor]}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
