"""The local backend keeps its promises (a real hub, as root): a session of 1 CPU and 2 GiB
runs on one core, in a cgroup of its own where a process that allocates 3 GiB is stopped, and
a session past its walltime is ended, its fine-tune run checkpointed first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from aifab.magics.examples import write_ping_pong
from aifab.spawners.local_limits import SessionCgroup

pytestmark = pytest.mark.hub

HUB_CONFIG = """
from aifab.spawners import use_placement_spawner
use_placement_spawner(c, profiles=[{{
    "slug": "lim", "display_name": "Limited", "backend": "local", "default": True,
    "choices": {{"cpus": {{"default": 1, "min": 1, "max": 2}},
                "memory_gb": {{"default": 2, "min": 1, "max": 4}},
                "walltime": {{"default": "00:05:00", "min": "00:01:00", "max": "00:10:00"}}}}}}])
c.JupyterHub.authenticator_class = "null"
c.LocalSessionSpawner.home_dir_template = {home!r}
c.Spawner.poll_interval = 2
"""


def server_pid(user: str) -> int:
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any("jupyterhub-singleuser" in a for a in proc.info["cmdline"] or []) \
                    and proc.environ().get("JUPYTERHUB_USER") == user:
                return proc.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise AssertionError(f"no single-user server of {user}")


def run_in(group: SessionCgroup, code: str) -> subprocess.CompletedProcess:
    """Run Python in the session's cgroup, as a process the session started would be."""
    join = "; ".join(f"echo $$ > {f}" for f in group.procs_files())
    return subprocess.run(["sh", "-c", f'{join}; exec "$0" -c "$1"', sys.executable, code],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def hub(hub_factory, tmp_path):
    if not SessionCgroup.available():
        pytest.fail("the local backend's cgroups need root and the cpuset and memory "
                    "controllers (the suite runs as root, as `make test` does in CI)")
    hub = hub_factory(extra_config=HUB_CONFIG.format(home=str(tmp_path / "home" / "{username}")))
    hub.start()
    for name in ("aifabwsa", "aifabwsb", "small", "short"):
        assert hub.api("POST", f"/users/{name}").status_code in (201, 409)
    return hub


def test_a_1_cpu_2_gib_session_uses_one_core_and_cannot_take_3_gib(hub):
    r = hub.api("POST", "/users/small/server", json={"profile": "lim", "cpus": 1,
                                                    "memory_gb": 2})
    assert r.status_code in (201, 202), r.text
    hub.wait_for_server("small", 90)
    pid = server_pid("small")
    assert len(os.sched_getaffinity(pid)) == 1  # one core, not the machine's two
    group = SessionCgroup("small-default")
    assert pid in group.pids()  # and with it everything it starts
    small = run_in(group, "import os; x = bytearray(2**30); "
                          "print(len(os.sched_getaffinity(0)))")
    assert small.returncode == 0 and small.stdout.strip() == "1", small.stderr
    big = run_in(group, "x = bytearray(3 * 2**30); print('allocated')")
    assert big.returncode == -9 and "allocated" not in big.stdout  # the OOM killer stopped it

    hub.api("DELETE", "/users/small/server")
    hub.wait_for_stopped("small", 90)
    assert not any(d.exists() for d in group.dirs.values())  # the cgroup went with it


def test_a_session_past_its_walltime_ends_and_its_run_checkpoints(hub, tiny_model, tmp_path):
    r = hub.api("POST", "/users/short/server", json={"profile": "lim", "cpus": 2,
                                                    "memory_gb": 4, "walltime": "00:01:00"})
    assert r.status_code in (201, 202), r.text
    started = time.time()
    hub.wait_for_server("short", 90)
    api = f"{hub.url}/user/short/aifab/api"
    auth = {"Authorization": f"token {hub.token}"}
    session = requests.get(f"{api}/session", headers=auth, timeout=30).json()
    assert 50 <= session["walltime_left"] <= 60  # the session knows its end
    data = write_ping_pong(tmp_path / "ping.jsonl")
    out = tmp_path / "run"
    r = requests.post(f"{api}/services", headers=auth, timeout=60, json={
        "kind": "finetune", "name": "long", "model": str(tiny_model), "data": str(data),
        "max_steps": 5000, "seq_len": 64, "save_steps": 1000, "output": str(out)})
    assert r.status_code == 201, r.text

    hub.wait_for_stopped("short", 120)
    assert time.time() - started >= 55  # ended at its walltime, not before
    assert "walltime reached; stopping the session" in hub.log_tail(400)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stop = next(e for e in events if e.get("event") == "interrupted")
    assert stop["reason"] in ("walltime", "SIGTERM")
    assert (out / "checkpoints" / f"checkpoint-{stop['step']}" / "aifab-complete").is_file()
    assert not any("aifab.extension.trainer" in " ".join(p.info["cmdline"] or [])
                   for p in psutil.process_iter(["cmdline"]))
    assert not Path(SessionCgroup("short-default").dirs["memory"]).exists()
