"""Kernels inside an allocation, on the real Slurm: a local session's JupyterLab starts a
kernel from the per-profile kernel spec, through the real kernel REST API; the kernel runs
as a step of the session's allocation, with the allocation's part of the session contract;
its ZeroMQ ports answer only with the Curve keys of its connection file; a restart reuses
the allocation, a shutdown ends the step and leaves the allocation to its own lifetime."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import zmq
from jupyter_client import BlockingKernelClient
from jupyter_client.session import Session

from aifab.spawners.loadtest import execute_content, kernel_channel
from tests.harness.jupyter import JupyterServer
from tests.test_allocations import ENV, alloc_jobs

pytestmark = [pytest.mark.slurm]
SPEC = "aifab-gh200"


def run(server, kernel: str, code: str, timeout: float = 60) -> str:
    async def go():
        async with kernel_channel(server.url.rstrip("/"), kernel, server.token) as request:
            return await request("execute_request", execute_content(code),
                                 time.monotonic() + timeout)
    return asyncio.run(go())


def kernel_steps(slurm, job: str) -> list[str]:
    """The names of the allocation's kernel steps (aifab-kernel-<server instance>)."""
    out = slurm.run("squeue", "-h", "-s", "-j", job, "-o", "%i|%j", check=False).stdout
    return [name for _, name in (line.split("|", 1) for line in out.splitlines() if "|" in line)
            if name.startswith("aifab-kernel-")]


@pytest.fixture
def clean(slurm):
    yield slurm
    left = [r["job_id"] for r in alloc_jobs(slurm)]
    if left:
        slurm.run("scancel", *left, check=False)


def test_a_kernel_runs_as_a_step_of_the_sessions_allocation(clean, tmp_path):
    slurm = clean
    server = JupyterServer(tmp_path / "server", env=ENV)
    server.start()
    try:
        specs = server.get("api/kernelspecs").json()["kernelspecs"]
        assert specs[SPEC]["spec"]["display_name"] == "Python 3 (aifab) · GH200 ×4 · 1 h"
        r = server.request("POST", "api/kernels", json={"name": SPEC}, timeout=300)
        assert r.status_code == 201, r.text
        kernel = r.json()["id"]
        [alloc] = server.get("aifab/api/allocations").json()["allocations"]
        assert alloc["name"] == "kernel-gh200" and alloc["state"] == "running"
        job = alloc["job_id"]
        slurm.wait_for(lambda: len(kernel_steps(slurm, job)) == 1, 30, what="the kernel step")

        out = run(server, kernel, "import os; print(os.environ['SLURM_JOB_ID'], "
                                  "os.environ.get('SLURM_STEP_ID'), "
                                  "os.environ['AIFAB_SLURM_JOB_ID'], "
                                  "os.environ.get('CUDA_VISIBLE_DEVICES'))\n"
                                  "from aifab.session import Session; s = Session.from_env()\n"
                                  "print(s.backend, s.walltime_left() > 3000)")
        first, second = out.strip().splitlines()
        job_seen, step, contract_job, cuda = first.split()
        assert (job_seen, contract_job) == (job, job) and step.isdigit()
        assert second == "slurm True"  # the allocation's part of the session contract
        print("CUDA_VISIBLE_DEVICES in the step:", cuda)

        # the ZeroMQ ports answer only with the connection file's Curve keys
        conn_file = next((tmp_path / "server" / "runtime").glob(f"kernel-{kernel}.json"))
        info = json.loads(conn_file.read_text())
        assert info["curve_publickey"] and info["curve_secretkey"]
        assert oct(conn_file.stat().st_mode & 0o777) == "0o600"
        assert not answers_without_keys(info)
        assert not heartbeat_without_keys(info)
        client = BlockingKernelClient(connection_file=str(conn_file))
        client.load_connection_file()
        client.start_channels()
        try:
            assert client.kernel_info(reply=True, timeout=30)["content"]["status"] == "ok"
        finally:
            client.stop_channels()

        # a restart reuses the allocation
        r = server.request("POST", f"api/kernels/{kernel}/restart", timeout=300)
        assert r.status_code == 200, r.text
        assert job in run(server, kernel, "import os; print(os.environ['SLURM_JOB_ID'])")
        assert [a["job_id"] for a in server.get("aifab/api/allocations").json()
                ["allocations"]] == [job]
        slurm.wait_for(lambda: len(kernel_steps(slurm, job)) == 1, 30,
                       what="one kernel step after the restart (the old one ended)")
        before_crash = kernel_steps(slurm, job)

        # a restarted server finds the kernel's allocation again
        server.crash()
        server = JupyterServer(tmp_path / "server", env=ENV)
        server.start()
        [again] = server.get("aifab/api/allocations").json()["allocations"]
        assert (again["job_id"], again["state"]) == (job, "running")
        # the old server's kernel cannot be reached any more: its step is ended
        slurm.wait_for(lambda: not set(before_crash) & set(kernel_steps(slurm, job)), 30,
                       what="the earlier server's kernel step ended")
        r = server.request("POST", "api/kernels", json={"name": SPEC}, timeout=300)
        assert r.status_code == 201, r.text
        kernel = r.json()["id"]
        assert job in run(server, kernel, "import os; print(os.environ['SLURM_JOB_ID'])")

        # shutdown ends the step; the allocation stays until it is released
        assert server.request("DELETE", f"api/kernels/{kernel}").status_code == 204
        slurm.wait_for(lambda: not kernel_steps(slurm, job), 30, what="the kernel's step gone")
        assert [r["job_id"] for r in alloc_jobs(slurm)] == [job]
    finally:
        server.stop()
    # the session ended: no step, no job left
    slurm.wait_for(lambda: not alloc_jobs(slurm), 15, what="the allocation cancelled")


def answers_without_keys(info: dict) -> bool:
    """A kernel_info_request on the shell port, signed with the session key but without the
    Curve keys: does the kernel answer within 3 s?"""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(f"tcp://{info['ip']}:{info['shell_port']}")
        session = Session(key=info["key"].encode(), signature_scheme=info["signature_scheme"])
        session.send(sock, session.msg("kernel_info_request"))
        return bool(sock.poll(3000))
    finally:
        sock.close()
        ctx.term()


def heartbeat_without_keys(info: dict) -> bool:
    """A ping on the heartbeat port without the Curve keys: does it come back within 3 s?"""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.linger = 0
    try:
        sock.connect(f"tcp://{info['ip']}:{info['hb_port']}")
        sock.send(b"ping")
        return bool(sock.poll(3000))
    finally:
        sock.close()
        ctx.term()
