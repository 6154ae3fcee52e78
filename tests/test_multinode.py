"""Allocations of several nodes, on a real Slurm of two nodes (each slurmd in network and UTS
namespaces of its own: tests/harness/slurm_nodes.py): the nodes are distinct hosts; a
fine-tune `--on` a 2-node allocation runs one torchrun per node meeting at the first node,
fails clearly when one rank is killed, and resumes from its checkpoint to the exact step
count; serving across nodes is refused with what is supported."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import psutil
import pytest

from aifab.allocation import Allowance, allowances_to_env
from tests.harness.jupyter import JupyterServer

pytestmark = [pytest.mark.slurm]

MULTI = Allowance(profile="multi", partition="multi", gres_type="gh200", max_nodes=2,
                  max_gpus=2, max_cpus=4, max_memory_gb=8, max_walltime_s=3600,
                  default_walltime_s=600)
PAIR = {"profile": "multi", "name": "pair", "nodes": 2, "gpus": 0, "cpus": 2, "memory_gb": 2,
        "walltime": "00:20:00"}
STEPS = 150  # enough that the run is still going when a rank is killed after step 10


def test_each_node_is_a_host_of_its_own_with_its_gpus(slurm_nodes):
    out = slurm_nodes.run(
        "srun", "-N2", "-n2", "--gres=gpu:gh200:2", "sh", "-c",
        'echo "$(hostname) $(getent hosts "$(hostname)" | cut -d" " -f1) '
        '$SLURM_NODEID $CUDA_VISIBLE_DEVICES"').stdout
    rows = sorted(line.split() for line in out.splitlines())
    assert rows == [["node1", "10.213.7.11", "0", "0,1"], ["node2", "10.213.7.12", "1", "0,1"]]
    # and the nodes reach each other by name over their own network
    assert slurm_nodes.run("srun", "-N1", "-w", "node2", "python3", "-c",
                           "import socket; print(socket.getaddrinfo('node1', 0)[0][4][0])"
                           ).stdout.strip() == "10.213.7.11"


def _wait_run(server, name: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while (info := server.get(f"aifab/api/services/{name}").json())["status"] in (
            "starting", "stopping"):
        assert time.monotonic() < deadline, info
        time.sleep(0.5)
    return info


def _events(metrics: Path, event: str) -> list[dict]:
    if not metrics.exists():
        return []
    return [json.loads(line) for line in metrics.read_text().splitlines()
            if f'"event": "{event}"' in line]


def _trainer_of_rank(rank: str, output: Path) -> psutil.Process | None:
    """The trainer process of one rank of the run writing to ``output`` (on its node: this
    machine, in the node's namespaces)."""
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "aifab.extension.trainer" in cmd and str(output) in cmd and \
                "torch.distributed.run" not in cmd:
            try:
                if proc.environ().get("RANK") == rank:
                    return proc
            except psutil.Error:
                continue
    return None


def test_a_run_on_two_nodes_fails_with_a_rank_and_resumes_to_the_exact_step(
        slurm_nodes, tmp_path, tiny_model):
    from aifab.magics.examples import write_ping_pong

    env = {"AIFAB_BACKEND": "local", "AIFAB_ALLOCATABLE": allowances_to_env([MULTI]),
           "JUPYTERHUB_USER": "multi-tester", "JUPYTERHUB_SERVER_NAME": "",
           **slurm_nodes.env}
    data = write_ping_pong(tmp_path / "ping.jsonl")
    out = tmp_path / "duo"
    run = {"kind": "finetune", "name": "duo", "model": str(tiny_model), "data": str(data),
           "max_steps": STEPS, "save_steps": 10, "seq_len": 64, "lr": 1e-3, "on": "pair",
           "nodes": 2, "output": str(out)}
    with JupyterServer(tmp_path / "server", env=env) as server:
        # several nodes without an allocation of them: refused, naming what is needed
        r = server.request("POST", "aifab/api/services", json={**run, "on": ""})
        assert r.status_code == 400
        assert "add on=ALLOCATION" in r.json()["message"], r.json()
        r = server.request("POST", "aifab/api/allocations", json=PAIR)
        assert r.status_code == 201, r.text
        deadline = time.monotonic() + 60
        while (alloc := server.get("aifab/api/allocations/pair").json())["state"] != "running":
            assert time.monotonic() < deadline, alloc
            time.sleep(0.25)
        assert alloc["nodes"] == ["node1", "node2"]
        job = alloc["job_id"]

        r = server.request("POST", "aifab/api/services", json={**run, "nodes": 3})
        assert r.status_code == 400
        assert r.json()["message"] == ("nodes=3: allocation 'pair' has 2 node(s) "
                                       "(node1, node2)")
        # serving across nodes: refused with what is supported
        r = server.request("POST", "aifab/api/services", json={
            "kind": "vllm", "name": "wide", "model": str(tiny_model), "on": "pair"})
        assert r.status_code == 400
        assert "serving across nodes" in r.json()["message"] and \
            "allocate one node" in r.json()["message"], r.json()

        r = server.request("POST", "aifab/api/services", json=run)
        assert r.status_code == 201, r.text
        # one step over both nodes (srun registers it a moment after it starts)
        slurm_nodes.wait_for(lambda: re.search(
            r"^aifab-run-duo-[0-9a-f]{6}\|node\[1-2\]$", slurm_nodes.run(
                "squeue", "-h", "-s", "-j", job, "-o", "%j|%N").stdout, re.M), 30,
            what="the run's step on node[1-2]")

        # past the first checkpoint, kill -9 rank 1's trainer on node2
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not _events(metrics, "checkpoint") or \
                (victim := _trainer_of_rank("1", out)) is None:
            assert time.monotonic() < deadline, server.get(
                "aifab/api/services/duo/logs", params={"n": "60"}).text
            time.sleep(0.2)
        victim.kill()
        failed = _wait_run(server, "duo")
        assert failed["status"] == "failed", failed
        log = "\n".join(server.get("aifab/api/services/duo/logs",
                                   params={"n": "2000"}).json()["lines"])
        # both hosts took part; the metrics come from rank 0 alone
        assert "aifab trainer: rank 0 of 2 on node1" in log, log[-3000:]
        assert "aifab trainer: rank 1 of 2 on node2" in log, log[-3000:]
        start = _events(metrics, "start")[0]
        assert (start["host"], start["shape"]["world_size"]) == ("node1", 2)
        done = sorted(int(d.name.split("-")[1]) for d in (out / "checkpoints").glob(
            "checkpoint-*") if (d / "aifab-complete").exists())
        assert done and done[-1] < STEPS, done
        slurm_nodes.wait_for(lambda: "aifab-run-duo" not in slurm_nodes.run(
            "squeue", "-h", "-s", "-j", job, "-o", "%j").stdout, 30,
            what="the failed run's step ended on both nodes")

        # resume on the same allocation: on from the last checkpoint to exactly STEPS
        r = server.request("POST", "aifab/api/services/duo/resume")
        assert r.status_code == 201, r.text
        finished = _wait_run(server, "duo")
        assert finished["status"] == "finished", finished
        assert json.loads((out / "aifab-run.json").read_text())["steps"] == STEPS
        resumed = _events(metrics, "start")[-1]
        assert resumed["resume_from"].endswith(f"checkpoint-{done[-1]}"), resumed
        assert _events(metrics, "done")[-1]["step"] == STEPS

        r = server.request("DELETE", "aifab/api/allocations/pair")
        assert r.status_code == 200, r.text
    slurm_nodes.wait_for(lambda: not slurm_nodes.squeue(), 20, what="the allocation gone")


def test_dask_workers_run_as_steps_on_both_nodes(slurm_nodes, tmp_path, ipython_on,
                                                 monkeypatch):
    """`aifab.cluster(on=ALLOC)`: the workers are steps of the allocation, one per node (by
    their number), the scheduler in the kernel on the interface the nodes reach; closing the
    cluster ends the steps, the allocation stays."""
    from distributed import Client

    import aifab
    from aifab.magics.dask_cluster import ClusterOptionError

    env = {"AIFAB_BACKEND": "local", "AIFAB_ALLOCATABLE": allowances_to_env([MULTI]),
           "JUPYTERHUB_USER": "multi-tester", "JUPYTERHUB_SERVER_NAME": "",
           **slurm_nodes.env}
    with JupyterServer(tmp_path / "server", env=env) as server:
        ipython_on(server)
        monkeypatch.setenv("SLURM_CONF", slurm_nodes.env["SLURM_CONF"])  # the kernel's Slurm
        alloc = aifab.allocate("multi", nodes=2, gpus=0, cpus=2, memory_gb=2,
                               walltime="00:20:00", name="pair", wait=True, timeout=60)
        with pytest.raises(ClusterOptionError, match="'queue' is the allocation's own"):
            aifab.cluster(on="pair", workers=1, queue="debug")
        with pytest.raises(ClusterOptionError, match="give interface=NAME"):
            aifab.cluster(on="pair", workers=1)
        cluster = aifab.cluster(on="pair", workers=2, cores=1, memory="1GiB",
                                interface=slurm_nodes.bridge)
        try:
            with Client(cluster) as client:
                client.wait_for_workers(2, timeout=120)
                hosts = client.run(lambda: __import__("socket").gethostname())
                assert sorted(hosts.values()) == ["node1", "node2"], hosts
                # the workers listen on their nodes' addresses, which the scheduler reaches
                assert sorted(a.split("//")[1].rsplit(":", 1)[0] for a in hosts) == \
                    ["10.213.7.11", "10.213.7.12"], hosts
                assert client.submit(sum, [1, 2, 3]).result(timeout=60) == 6
            steps = slurm_nodes.run("squeue", "-h", "-s", "-j", alloc.job_id,
                                    "-o", "%j").stdout.split()
            assert len([s for s in steps if s.startswith("aifab-dask-")]) == 2, steps
        finally:
            cluster.close()
        slurm_nodes.wait_for(lambda: "aifab-dask-" not in slurm_nodes.run(
            "squeue", "-h", "-s", "-j", alloc.job_id, "-o", "%j").stdout, 30,
            what="the worker steps ended")
        assert alloc.state == "running"
        alloc.release()
    slurm_nodes.wait_for(lambda: not slurm_nodes.squeue(), 20, what="the allocation gone")
