"""PlacementSpawner through a real JupyterHub on the real Slurm fixture, with the site
example configuration loaded as it is."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pytest
import requests

from tests.slurm_hub import create_hub_user, make_slurm_hub

pytestmark = [pytest.mark.slurm, pytest.mark.hub]


@pytest.fixture(scope="module")
def slurm_hub(slurm, test_user, work_root):
    root = Path(tempfile.mkdtemp(prefix="slurm-hub-", dir=work_root))
    root.chmod(0o755)
    hub = make_slurm_hub(root)
    hub.start()
    create_hub_user(hub, test_user.pw_name)
    yield hub
    for name in (test_user.pw_name,):
        hub.api("DELETE", f"/users/{name}/server")
    hub.stop()
    slurm.run("scancel", "--user", test_user.pw_name, check=False)


def proxied(hub, path: str) -> requests.Response:
    """A request through the proxy to a user's server, with the hub token (access:servers)."""
    return requests.get(f"{hub.url}{path}", headers={"Authorization": f"token {hub.token}"},
                        timeout=30)


def session_job(slurm, user: str) -> dict | None:
    rows = [r for r in slurm.squeue("-u", user) if r["name"] == f"aifab-{user}"]
    return rows[0] if rows else None


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
    filler = slurm.run("sbatch", "--parsable", "-p", "gh200", "--gres=gpu:gh200:4",
                       "-o", "/dev/null", "--wrap", "sleep 300").stdout.strip()
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
