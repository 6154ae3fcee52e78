"""PlacementSpawner through a real JupyterHub on the real Slurm fixture, with the site
example configuration loaded as it is."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import requests

from tests.slurm_hub import (
    SITE_CONFIG,
    TEST_OVERRIDES,
    create_hub_user,
    ensure_unix_user,
    proxied,
    session_job,
)

pytestmark = [pytest.mark.slurm, pytest.mark.hub]

OTHER_USERS = ("aifabtest2", "aifabtest3")
FILLER = "aifab-test-filler"  # the job that holds every GPU of the gh200 node


def fill_the_gpu_node(slurm) -> str:
    return slurm.run("sbatch", "--parsable", "-J", FILLER, "-p", "gh200", "--gres=gpu:gh200:4",
                     "-o", "/dev/null", "--wrap", "sleep 300").stdout.strip()


@pytest.fixture(autouse=True)
def no_session_left(slurm_hub, slurm, test_user):
    """Each test starts with no session and no job of the test users (nor a filler job) and
    leaves none, even when it fails: one test's leftovers never decide another's result."""
    users = (test_user.pw_name, *OTHER_USERS)

    def clean():
        known = []
        for name in users:
            r = slurm_hub.api("GET", f"/users/{name}")
            if r.status_code == 404:
                continue
            known.append(name)
            if "" in r.json().get("servers", {}):
                slurm_hub.api("DELETE", f"/users/{name}/server")
        slurm.run("scancel", "-n", FILLER, check=False)
        for name in users:
            slurm.run("scancel", "-u", name, check=False)  # also a job still queued
        for name in known:
            slurm_hub.wait_for_stopped(name, timeout=60)
        slurm.wait_for(lambda: not [r for r in slurm.squeue()
                                    if r["user"] in users or r["name"] == FILLER],
                       30, what="the test users' jobs gone")

    clean()
    yield
    clean()


def test_gpu_session_on_slurm_reaches_the_user_and_stops_cleanly(slurm_hub, slurm, test_user):
    user = test_user.pw_name
    r = slurm_hub.api("POST", f"/users/{user}/server",
                      json={"profile": "gh200", "gpus": 2, "walltime": "00:30:00"})
    assert r.status_code in (201, 202), r.text
    t_post = time.time()
    slurm_hub.wait_for_server(user, timeout=90)

    status = proxied(slurm_hub, f"/user/{user}/api/status")
    assert status.status_code == 200, status.text

    session = proxied(slurm_hub, f"/user/{user}/aifab/api/session").json()
    assert session["backend"] == "slurm" and session["profile"] == "gh200"
    assert session["gpu_count"] == 2
    assert len(session["visible_gpus"]) == 2  # Slurm's CUDA_VISIBLE_DEVICES in the server
    assert session["source"] == "contract"
    assert 1700 < session["walltime_left"] <= 1800
    assert abs(session["walltime_end"] - (t_post + 1800)) < 60

    job = session_job(slurm, user)
    assert job and job["state"] == "RUNNING"
    assert session["slurm_job_id"] == job["job_id"]
    assert job["partition"] == "gh200"

    r = slurm_hub.api("DELETE", f"/users/{user}/server")
    assert r.status_code in (202, 204)
    slurm_hub.wait_for_stopped(user)
    slurm.wait_for(lambda: session_job(slurm, user) is None, 15, what="session job gone")


def read_progress(hub, user: str, until: str, timeout: float) -> list[str]:
    """Messages of the spawn's progress stream, until one contains ``until``."""
    messages: list[str] = []
    deadline = time.monotonic() + timeout
    with requests.get(f"{hub.url}/hub/api/users/{user}/server/progress", stream=True,
                      headers={"Authorization": f"token {hub.token}"}, timeout=timeout) as r:
        for line in r.iter_lines(decode_unicode=True):
            if line and line.startswith("data:"):
                event = json.loads(line[5:])
                messages.append(event.get("message", ""))
                if until in messages[-1] or event.get("ready") or event.get("failed"):
                    break
            if time.monotonic() > deadline:
                break
    return messages


def test_queue_wait_shows_slurms_reason_then_starts(slurm_hub, slurm, test_user, work_root):
    user = test_user.pw_name
    filler = fill_the_gpu_node(slurm)
    try:
        slurm.wait_for(lambda: any(r["job_id"] == filler and r["state"] == "RUNNING"
                                   for r in slurm.squeue()), 15, what="filler job running")
        r = slurm_hub.api("POST", f"/users/{user}/server", json={"profile": "gh200", "gpus": 1})
        assert r.status_code == 202, r.text  # still queued after the hub's slow-spawn timeout
        messages = read_progress(slurm_hub, user, "queued", timeout=30)
        assert any("queued (Resources)" in m for m in messages), messages
        job = session_job(slurm, user)
        assert job["state"] == "PENDING" and job["reason"] == "Resources"
    finally:
        slurm.run("scancel", filler)
    slurm_hub.wait_for_server(user, timeout=90)
    assert proxied(slurm_hub, f"/user/{user}/api/status").status_code == 200
    slurm_hub.api("DELETE", f"/users/{user}/server")
    slurm_hub.wait_for_stopped(user)


def test_hub_restart_readopts_three_running_sessions(slurm_hub, slurm, test_user):
    users = [test_user.pw_name, "aifabtest2", "aifabtest3"]
    for name in users[1:]:
        ensure_unix_user(name)
        create_hub_user(slurm_hub, name)
    for name in users:
        r = slurm_hub.api("POST", f"/users/{name}/server", json={"profile": "gh200", "gpus": 1})
        assert r.status_code in (201, 202), r.text
    for name in users:
        slurm_hub.wait_for_server(name, timeout=90)
    jobs_before = {name: session_job(slurm, name)["job_id"] for name in users}

    slurm_hub.restart()

    for name in users:
        assert proxied(slurm_hub, f"/user/{name}/api/status").status_code == 200, name
        assert slurm_hub.user_model(name)["servers"][""]["ready"]
    jobs_after = {name: (session_job(slurm, name) or {}).get("job_id") for name in users}
    assert jobs_after == jobs_before  # none cancelled, none resubmitted

    for name in users:
        slurm_hub.api("DELETE", f"/users/{name}/server")
    for name in users:
        slurm_hub.wait_for_stopped(name)
    slurm.wait_for(lambda: all(session_job(slurm, n) is None for n in users), 20,
                   what="all three session jobs gone")


def server_token(user: str) -> str:
    """The API token in the environment of the user's running single-user server."""
    pids = subprocess.run(["pgrep", "-u", user, "-f", "jupyterhub-singleuser"],
                          capture_output=True, text=True).stdout.split()
    for pid in pids:
        token = psutil.Process(int(pid)).environ().get("JUPYTERHUB_API_TOKEN")
        if token:
            return token
    raise AssertionError(f"no running single-user server of {user}")


def test_a_job_may_report_its_port_and_nothing_else_and_no_token_is_logged(
        slurm_hub, slurm, test_user):
    user = test_user.pw_name
    r = slurm_hub.api("POST", f"/users/{user}/server", json={"profile": "gh200", "gpus": 0})
    assert r.status_code in (201, 202), r.text
    slurm_hub.wait_for_server(user, timeout=90)
    token = server_token(user)
    url = f"{slurm_hub.url}/hub/api/batchspawner"
    auth = {"Authorization": f"token {token}"}
    for body in ({"port": 40000, "cmd": ["/bin/sh", "-c", "id"]}, {"batch_script": "x"},
                 {"port": "40000"}, {"port": 80}, {"port": True}, [40000]):
        r = requests.post(url, json=body, headers=auth, timeout=30)
        assert r.status_code == 400, (body, r.text)
    # the test's service token is valid, but no server's: refused by our port handler
    r = requests.post(url, json={"port": 40000}, timeout=30,
                      headers={"Authorization": f"token {slurm_hub.token}"})
    assert r.status_code == 403, r.text
    assert r.json()["message"] == "this token belongs to no running server"
    r = requests.post(url, json={"port": 40000}, timeout=30,
                      headers={"Authorization": "token not-a-token"})
    assert r.status_code == 403, r.text
    assert proxied(slurm_hub, f"/user/{user}/api/status").status_code == 200  # unaffected

    job = session_job(slurm, user)["job_id"]
    slurm_hub.api("DELETE", f"/users/{user}/server")
    slurm_hub.wait_for_stopped(user)
    assert token not in slurm_hub.log_path.read_text()
    assert token not in (Path(test_user.pw_dir) / f"aifab-session-{job}.log").read_text()


def test_a_queue_wait_past_start_timeout_cancels_the_job_cleanly(
        hub_factory, slurm, test_user):
    user = test_user.pw_name
    hub = hub_factory(config_file=SITE_CONFIG,
                      extra_config=TEST_OVERRIDES + "c.SlurmSessionSpawner.start_timeout = 5\n")
    hub.start()
    create_hub_user(hub, user)
    filler = fill_the_gpu_node(slurm)
    try:
        # start_timeout (5 s) ends before the hub's slow_spawn_timeout (10 s) would answer
        # 202: the request itself sees the failed start
        r = hub.api("POST", f"/users/{user}/server", json={"profile": "gh200", "gpus": 1})
        assert r.status_code == 500, r.text
        hub.wait_for_stopped(user, timeout=30)
        slurm.wait_for(lambda: session_job(slurm, user) is None, 15,
                       what="timed-out session job cancelled")
        assert "failed to start in 5 seconds" in hub.log_tail(300)
    finally:
        slurm.run("scancel", filler)
    r = hub.api("POST", f"/users/{user}/server", json={"profile": "gh200", "gpus": 1})
    assert r.status_code in (201, 202), r.text
    hub.wait_for_server(user, timeout=90)
    hub.api("DELETE", f"/users/{user}/server")
    hub.wait_for_stopped(user)
