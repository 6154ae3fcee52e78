"""Slurm allocations held by a session, on the real Slurm: requested from a local session
(the demo's case), watched while they queue, found again by a restarted server, released by
hand, when idle, and when the session ends; bad requests refused with what is allowed."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

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
    # an earlier test's cancelled job may still be COMPLETING: only a new job id would be ours
    before = {r["job_id"] for r in alloc_jobs(slurm)}
    r = server.request("POST", "aifab/api/allocations", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["message"], r.json()["message"]
    assert server.get("aifab/api/allocations").json()["allocations"] == []
    submitted = {r["job_id"] for r in alloc_jobs(slurm)} - before
    assert not submitted, f"a refused request submitted job(s) {submitted}"


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


def _curl(*args: str, user: str | None = None) -> subprocess.CompletedProcess:
    sudo = ["sudo", "-u", user] if user else []
    return subprocess.run([*sudo, "curl", "-s", "--max-time", "10", *args],
                          capture_output=True, text=True, timeout=30)


def test_serve_on_an_allocation_answers_the_proxy_and_nobody_else(clean, tmp_path, tiny_model,
                                                                   test_user):
    """`%serve tiny --on ALLOC` (its REST form): vLLM is a step of the allocation, on its
    node's address; the session's proxy reaches it, and without the proxy's client
    certificate nobody gets any answer from any endpoint: not another Unix user, not this
    one, not with a certificate of another service."""
    from aifab.extension import tls

    slurm = clean
    with JupyterServer(tmp_path / "server", env=ENV) as server:
        r = server.request("POST", "aifab/api/allocations", json={**SMALL, "name": "infer"})
        assert r.status_code == 201, r.text
        job = wait_state(server, "infer", "running")["job_id"]
        serve = {"kind": "vllm", "name": "tiny-on", "model": str(tiny_model), "on": "infer",
                 "gpus": 0, "max_model_len": 256}
        r = server.request("POST", "aifab/api/services", json=serve)
        assert r.status_code == 201, r.text
        slurm.wait_for(lambda: re.search(r"\|aifab-serve-tiny-on-[0-9a-f]{6}$", slurm.run(
            "squeue", "-h", "-s", "-j", job, "-o", "%i|%j").stdout, re.M), 30,
            what="vLLM's step in the allocation")

        deadline = time.monotonic() + 300
        while (info := server.get("aifab/api/services/tiny-on").json())["status"] == "starting":
            assert time.monotonic() < deadline, info
            time.sleep(0.5)
        assert info["status"] == "ready", server.get(
            "aifab/api/services/tiny-on/logs", params={"n": "60"}).text
        assert info["host"] == "127.0.0.1" and info["port"] > 0  # the node's NodeAddr
        chat = server.request("POST", "aifab/proxy/tiny-on/v1/chat/completions", json={
            "model": "tiny-on", "max_tokens": 4,
            "messages": [{"role": "user", "content": "ping"}]})
        assert chat.status_code == 200, chat.text
        assert chat.json()["choices"][0]["message"]["content"]

        url = f"https://{info['host']}:{info['port']}"
        certs = Path(info["tls"])
        key = json.loads((Path(info["dir"]) / "record.json").read_text())["api_key"]
        # the positive control: with the proxy's certificate, the service answers
        mine = ["--cacert", str(certs / "aifab-service-ca" / "aifab-service-ca.crt"),
                "--cert", str(certs / "aifab-proxy" / "aifab-proxy.crt"),
                "--key", str(certs / "aifab-proxy" / "aifab-proxy.key")]
        ok = _curl(*mine, "-H", f"Authorization: Bearer {key}", f"{url}/v1/models")
        assert ok.returncode == 0 and "tiny-on" in ok.stdout, (ok.returncode, ok.stderr)
        # and vLLM's own key is still asked for behind the certificate
        keyless = _curl(*mine, "-o", "/dev/null", "-w", "%{http_code}", f"{url}/v1/models")
        assert keyless.stdout == "401", (keyless.stdout, keyless.stderr)
        # a certificate of another service's CA
        other = tls.write_service_tls(tmp_path, tls.make_service_tls("127.0.0.1"))
        theirs = ["--cert", str(other / "aifab-proxy" / "aifab-proxy.crt"),
                  "--key", str(other / "aifab-proxy" / "aifab-proxy.key")]
        for user, extra in ((test_user.pw_name, []), (None, []), (None, theirs)):
            for path in ("/tokenize", "/metrics", "/invocations", "/v1/models"):
                refused = _curl("-k", *extra, f"{url}{path}", user=user)
                assert refused.returncode != 0 and not refused.stdout, (user, extra, path)
        plain = _curl(f"http://{info['host']}:{info['port']}/metrics", user=test_user.pw_name)
        assert "vllm:" not in plain.stdout  # plain HTTP to a TLS port: nothing of vLLM's

        stopped = server.request("DELETE", "aifab/api/services/tiny-on").json()
        assert stopped["status"] == "stopped"
        slurm.wait_for(lambda: "aifab-serve-tiny-on" not in slurm.run(
            "squeue", "-h", "-s", "-j", job, "-o", "%j").stdout, 20, what="the step gone")
        assert server.get("aifab/api/allocations/infer").json()["state"] == "running"
    slurm.wait_for(lambda: not alloc_jobs(slurm), 15, what="the allocation cancelled at the end")
