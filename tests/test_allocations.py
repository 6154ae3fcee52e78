"""Slurm allocations held by a session, on the real Slurm: requested from a local session
(the demo's case), watched while they queue, found again by a restarted server, released by
hand, when idle, and when the session ends; bad requests refused with what is allowed."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from aifab.allocation import Allowance, allowances_to_env
from tests.harness.jupyter import JupyterServer
from tests.harness.slurm import NODE

pytestmark = [pytest.mark.slurm]

GH200 = Allowance(profile="gh200", partition="gh200", gres_type="gh200", max_nodes=1,
                  max_gpus=4, max_cpus=288, max_memory_gb=460, max_walltime_s=3600,
                  default_walltime_s=1800)
ENV = {"AIFAB_BACKEND": "local", "AIFAB_ALLOCATABLE": allowances_to_env([GH200]),
       "JUPYTERHUB_USER": "alloc-tester", "JUPYTERHUB_SERVER_NAME": ""}
SMALL = {"profile": "gh200", "gpus": 1, "cpus": 2, "memory_gb": 4, "walltime": "00:10:00"}


@pytest.fixture
def clean(slurm):
    yield slurm
    left = [r["job_id"] for r in slurm.squeue() if r["name"] in ("aifab-alloc", "blocker")]
    if left:
        slurm.run("scancel", *left, check=False)


@pytest.fixture(scope="module")
def one_server(slurm, tmp_path_factory):
    """One server for the requests that must be refused (none of them allocates)."""
    with JupyterServer(tmp_path_factory.mktemp("refusals"), env=ENV) as server:
        yield server, slurm


def alloc_jobs(slurm) -> list[dict]:
    return [r for r in slurm.squeue() if r["name"] == "aifab-alloc"]


def wait_state(server, name: str, state: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    info = {}
    while time.monotonic() < deadline:
        info = server.get(f"aifab/api/allocations/{name}").json()
        if info.get("state") == state:
            return info
        time.sleep(0.25)
    raise AssertionError(f"allocation {name} is {info.get('state')!r}, not {state!r}: {info}")


def test_request_hold_find_again_after_a_restart_and_release(clean, tmp_path):
    slurm = clean
    server = JupyterServer(tmp_path / "server", env=ENV)
    server.start()
    try:
        r = server.request("POST", "aifab/api/allocations", json={**SMALL, "name": "gpu"})
        assert r.status_code == 201, r.text
        job = r.json()["job_id"]
        info = wait_state(server, "gpu", "running")
        assert info["nodes"] == [NODE]
        [row] = alloc_jobs(slurm)
        assert row["job_id"] == job and row["gres"].endswith("gpu:gh200:1"), row
        # the record outlives the server: a new one finds the same job, still held
        server.crash()
        server = JupyterServer(tmp_path / "server", env=ENV)
        server.start()
        again = server.get("aifab/api/allocations/gpu").json()
        assert (again["job_id"], again["state"]) == (job, "running")
        listed = server.get("aifab/api/allocations").json()
        assert [a["name"] for a in listed["allocations"]] == ["gpu"]
        assert listed["allowed"] == [GH200.describe()]
        # a second one of the same name is refused while the first is held
        r = server.request("POST", "aifab/api/allocations", json={**SMALL, "name": "gpu"})
        assert r.status_code == 409 and "release it first" in r.json()["message"]
        r = server.request("DELETE", "aifab/api/allocations/gpu")
        assert r.status_code == 200 and r.json()["state"] == "released"
        slurm.wait_for(lambda: not alloc_jobs(slurm), 15, what="the allocation's job gone")
    finally:
        server.stop()


def test_a_queued_allocation_says_why_and_where_it_stands_then_starts(clean, tmp_path):
    slurm = clean
    blocker = slurm.run("sbatch", "--parsable", "-J", "blocker", "-p", "gh200", "--exclusive",
                        "-o", "/dev/null", "-t", "5", "--wrap", "sleep 300").stdout.strip()
    slurm.wait_for(lambda: any(r["job_id"] == blocker and r["state"] == "RUNNING"
                               for r in slurm.squeue()), 30, what="the blocker running")
    with JupyterServer(tmp_path / "server", env=ENV) as server:
        r = server.request("POST", "aifab/api/allocations", json={**SMALL, "name": "waits"})
        assert r.status_code == 201, r.text
        info = wait_state(server, "waits", "queued")
        deadline = time.monotonic() + 30
        while info["reason"] != "Resources" or info["position"] != 1:
            assert time.monotonic() < deadline, info
            time.sleep(0.5)
            info = server.get("aifab/api/allocations/waits").json()
        slurm.run("scancel", blocker)
        assert wait_state(server, "waits", "running")["nodes"] == [NODE]
    # the session ended: its allocation went with it
    slurm.wait_for(lambda: not alloc_jobs(slurm), 10, what="allocation cancelled at the end")


def test_an_allocation_nothing_runs_in_is_released_one_with_a_step_is_kept(clean, tmp_path):
    slurm = clean
    args = ("--AifabExtension.allocation_idle_timeout=10", "--AifabExtension.allocation_poll=1")
    with JupyterServer(tmp_path / "server", env=ENV, args=args) as server:
        for name in ("idle", "busy"):
            r = server.request("POST", "aifab/api/allocations", json={**SMALL, "name": name})
            assert r.status_code == 201, r.text
        busy = wait_state(server, "busy", "running")
        wait_state(server, "idle", "running")
        # a step of its own in "busy" (what a kernel or service inside it will be)
        step = subprocess.Popen(
            ["srun", "--overlap", f"--jobid={busy['job_id']}", "-n1", "sleep", "30"],
            env={**slurm.env, "PATH": "/usr/bin:/bin"}, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        try:
            idle = wait_state(server, "idle", "released", timeout=60)
            assert "nothing ran in it for 10 s" in idle["message"]
            info = server.get("aifab/api/allocations/busy").json()
            assert info["state"] == "running" and info["steps"] == 1, info
        finally:
            step.kill()
            step.wait()


@pytest.mark.parametrize("body, status, message", [
    ({**SMALL, "gpus": 5}, 400, "gpus=5: this profile allows 0 to 4 GPUs per node"),
    ({**SMALL, "walltime": "02:00:00"}, 400, "profile 'gh200' allows 1 minute to 01:00:00"),
    ({**SMALL, "walltime": "1:2:3:4"}, 400, "walltime: '1:2:3:4' is not a walltime"),
    ({**SMALL, "nodes": 2}, 400, "nodes=2: this profile allows 1 to 1 nodes"),
    ({**SMALL, "profile": "a100"}, 400, "profile 'a100' is not one you may allocate; "
                                        "allowed: gh200"),
    ({**SMALL, "argv": ["sleep"]}, 400, "'argv' is not a field of an allocation"),
    ({**SMALL, "name": "Bad Name"}, 400, "name 'Bad Name': lowercase letters"),
    ({**SMALL, "reservation": "other"}, 400, "reservation 'other': profile 'gh200' allows none"),
    ({**SMALL, "cpus": "many"}, 400, "cpus: a whole number of CPUs per node, got 'many'"),
    ([1, 2], 400, "an allocation request is a JSON object"),
])
def test_bad_requests_are_refused_with_what_the_profile_allows(one_server, body, status,
                                                               message):
    server, slurm = one_server
    r = server.request("POST", "aifab/api/allocations", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["message"], r.json()["message"]
    assert server.get("aifab/api/allocations").json()["allocations"] == []
    assert not alloc_jobs(slurm)  # nothing was submitted


def test_a_session_the_hub_gave_no_slurm_profile_holds_none(clean, tmp_path):
    env = {k: v for k, v in ENV.items() if k != "AIFAB_ALLOCATABLE"}
    with JupyterServer(tmp_path / "server", env=env) as server:
        r = server.request("POST", "aifab/api/allocations", json=SMALL)
        assert r.status_code == 400
        assert "the hub gave it no Slurm profile" in r.json()["message"]


def test_the_python_api_and_the_magic(clean, tmp_path, ipython_on):
    import aifab

    with JupyterServer(tmp_path / "server", env=ENV) as server:
        ip = ipython_on(server)
        alloc = aifab.allocate("gh200", gpus=0, cpus=1, memory_gb=2, walltime=5, name="api",
                               wait=True, timeout=60)
        assert alloc.state == "running" and alloc.nodes == [NODE]
        assert f"running on {NODE}" in repr(alloc)
        held = ip.run_line_magic("alloc", "gh200 --cpus 1 --memory 2 --walltime 00:05:00 "
                                          "--name magic --wait")
        assert held.state == "running"
        assert {a["name"] for a in aifab.allocations()} == {"api", "magic"}
        from IPython.core.error import UsageError

        with pytest.raises(UsageError, match="gpus=9: this profile allows 0 to 4"):
            ip.run_line_magic("alloc", "gh200 --gpus 9")
        ip.run_line_magic("alloc", "release magic")
        assert alloc.release()["state"] == "released"
        assert {a["state"] for a in aifab.allocations()} == {"released"}
    clean.wait_for(lambda: not alloc_jobs(clean), 15, what="the released jobs gone")


def test_a_finetune_on_an_allocation_is_a_step_pinned_by_the_ledger(clean, tmp_path,
                                                                    tiny_model):
    """`%finetune ... --on ALLOC` (here its REST form): the run is a step of the allocation,
    on its node, with the allocation's part of the session contract, and the ledger hands
    out the allocation's GPUs (one each, never twice)."""
    from aifab.magics.examples import write_ping_pong

    slurm = clean
    data = write_ping_pong(tmp_path / "ping.jsonl")
    run = {"kind": "finetune", "model": str(tiny_model), "data": str(data), "max_steps": 8,
           "seq_len": 64, "lr": 1e-3, "gpus": 1, "on": "train"}
    with JupyterServer(tmp_path / "server", env=ENV) as server:
        r = server.request("POST", "aifab/api/services", json={**run, "name": "early"})
        assert r.status_code == 400
        assert r.json()["message"].startswith("on='train': no such allocation of this session")
        r = server.request("POST", "aifab/api/allocations",
                           json={**SMALL, "gpus": 2, "name": "train"})
        assert r.status_code == 201, r.text
        job = wait_state(server, "train", "running")["job_id"]

        r = server.request("POST", "aifab/api/services",
                           json={**run, "name": "onalloc", "output": str(tmp_path / "out")})
        assert r.status_code == 201, r.text
        assert r.json()["gpus"] == ["train:0"]
        # the allocation's second GPU is free, a third is not there
        r = server.request("POST", "aifab/api/services",
                           json={**run, "name": "more", "gpus": 2, "output": str(tmp_path / "o2")})
        assert r.status_code == 409
        assert r.json()["message"].startswith("2 GPU(s) requested but 1 free: GPU train:0 "
                                              "held by 'onalloc'")
        steps = slurm.run("squeue", "-h", "-s", "-j", job, "-o", "%i|%j").stdout
        # a step name per launch: a late clean-up of one attempt never ends the next one's
        assert re.search(r"\|aifab-run-onalloc-[0-9a-f]{6}$", steps, re.M), steps

        deadline = time.monotonic() + 300
        while (info := server.get("aifab/api/services/onalloc").json())["status"] == "starting":
            assert time.monotonic() < deadline, info
            time.sleep(0.5)
        assert info["status"] == "finished", info
        start = next(json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").open()
                     if '"event": "start"' in line)
        assert (start["slurm_job_id"], start["cuda_visible_devices"]) == (job, "0")
        assert start["slurm_step_id"].isdigit()

        # Stop: srun passes the SIGTERM on, the run checkpoints on the node, its step ends
        long = {**run, "name": "long", "max_steps": 2000, "save_steps": 1000,
                "output": str(tmp_path / "long")}
        assert server.request("POST", "aifab/api/services", json=long).status_code == 201
        metrics = tmp_path / "long" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not metrics.exists() or metrics.read_text().count('"event": "step"') < 3:
            assert time.monotonic() < deadline, "the long run did not step"
            time.sleep(0.2)
        stopped = server.request("DELETE", "aifab/api/services/long").json()
        assert stopped["status"] == "stopped" and "checkpoint was saved" in stopped["error"]
        slurm.wait_for(lambda: "aifab-run-long" not in slurm.run(
            "squeue", "-h", "-s", "-j", job, "-o", "%j").stdout, 15, what="the run's step gone")
        assert list((tmp_path / "long" / "checkpoints").glob("checkpoint-*/aifab-complete"))
    slurm.wait_for(lambda: not alloc_jobs(slurm), 15, what="the allocation cancelled at the end")
