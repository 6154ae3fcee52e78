"""Work counts as activity: the real jupyterhub-idle-culler, with a short timeout, leaves a
session alone while its fine-tune run steps (nobody at the browser), culls it once the run
has ended, and a session culled anyway (``--max-age``) leaves its run a checkpoint.

The hub is real (JupyterHub + configurable-http-proxy), the session is a local one started
over the hub's REST API, the run is the real trainer on the tiny offline model (CPU), and
the culler is the one from PyPI, run as its own process with the scopes its README lists.
Nothing here talks to the user's server after the run is started: the test watches the run
on disk and the server through the hub's API, so the only activity is the session's own.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil
import pytest

from aifab.magics.examples import write_ping_pong
from tests.harness.hub import Hub, stop_process

pytestmark = [pytest.mark.hub]

USER = "busy"
TIMEOUT = 20  # the culler's --timeout: seconds without activity before a server is culled
CULL_EVERY = 2  # the culler's --cull-every
# The single-user server posts its activity every second, and the hub takes every update
# (activity_resolution) and asks the proxy every 2 s: what the hub sees is at most a few
# seconds behind the server.
HUB_CONFIG = """
from aifab.spawners import use_placement_spawner
use_placement_spawner(c, profiles=[{{"slug": "local-cpu", "display_name": "This machine",
                                    "backend": "local", "default": True,
                                    "choices": {{"cpus": 2, "memory_gb": 6}}}}])
c.JupyterHub.authenticator_class = "null"
c.LocalSessionSpawner.home_dir_template = {home!r}
c.Spawner.environment = {{"JUPYTERHUB_ACTIVITY_INTERVAL": "1"}}
c.JupyterHub.activity_resolution = 1
c.JupyterHub.last_activity_interval = 2
# the culler, as its README has it: a service with a role of these scopes
c.JupyterHub.services.append({{"name": "idle-culler", "api_token": {token!r}}})
c.JupyterHub.load_roles.append({{"name": "idle-culler", "services": ["idle-culler"],
    "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"]}})
"""


class Session:
    """A hub with one user's local session, its culler and its runs; their logs on failure."""

    def __init__(self, hub: Hub, culler_token: str, root: Path):
        self.hub, self.culler_token, self.root = hub, culler_token, root
        self.culler: subprocess.Popen | None = None
        self.culler_log = root / "culler.log"
        self.runs: list[Path] = []

    def start_server(self) -> None:
        r = self.hub.api("POST", f"/users/{USER}")
        assert r.status_code in (201, 409), r.text
        r = self.hub.api("POST", f"/users/{USER}/server", json={"profile": "local-cpu"})
        assert r.status_code in (201, 202), r.text
        self.hub.wait_for_server(USER, timeout=120)

    def server(self) -> dict | None:
        """The user's server as the hub lists it (None once it is gone)."""
        return self.hub.user_model(USER).get("servers", {}).get("")

    def start_culler(self, *args: str) -> None:
        cwd = self.root / "culler"  # it reads ./idle_culler_config.py: none here
        cwd.mkdir(exist_ok=True)
        log = open(self.culler_log, "ab")  # noqa: SIM115 - the child holds it
        self.culler = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub_idle_culler",
             f"--url=http://127.0.0.1:{self.hub.hub_port}/hub/api", *args],
            env={**os.environ, "JUPYTERHUB_API_TOKEN": self.culler_token}, cwd=cwd,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def stop_culler(self) -> None:
        if self.culler is not None:
            stop_process(self.culler, 10)
            self.culler = None

    def start_run(self, model: Path, data: Path, name: str, **opts) -> Path:
        """Start a run as a notebook does (aifab.finetune through the hub's proxy), from a
        process that then exits: no kernel, no browser stays behind."""
        out = self.root / "runs" / name
        self.runs.append(out)
        code = ("import json, sys, aifab\n"
                "run = aifab.finetune(sys.argv[1], sys.argv[2], name=sys.argv[3], "
                "output=sys.argv[4], **json.loads(sys.argv[5]))\n"
                "print(run.info['status'])\n")
        env = {**os.environ, "AIFAB_SERVER_URL": f"{self.hub.url}/user/{USER}/",
               "AIFAB_SERVER_TOKEN": self.hub.token}
        p = subprocess.run([sys.executable, "-c", code, str(model), str(data), name, str(out),
                            json.dumps(opts)], env=env, capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        return out

    def culler_lines(self) -> list[str]:
        try:
            return self.culler_log.read_text(errors="replace").splitlines()
        except OSError:
            return []

    def log_tail(self) -> str:
        parts = [f"--- hub (and the single-user server) ---\n{self.hub.log_tail(120)}",
                 "--- idle culler ---\n" + "\n".join(self.culler_lines()[-60:])]
        for out in self.runs:
            parts.append(f"--- run {out.name}: metrics (last lines) ---\n"
                         + "\n".join(_lines(out / "metrics.jsonl")[-8:]))
            for log in sorted(Path(self.root, "users").glob(f"**/{out.name}/service.log")):
                parts.append(f"--- run {out.name}: {log} ---\n"
                             + "\n".join(_lines(log)[-30:]))
        return "\n".join(parts)


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def events(out: Path) -> list[dict]:
    found = []
    for line in _lines(out / "metrics.jsonl"):
        try:
            found.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return found


def wait_for(what: str, check, timeout: float, session: Session, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what}: not after {timeout:.0f}s\n{session.log_tail()}")


def hub_time(stamp: str | None) -> float:
    """The hub's ISO timestamp as a time.time() value."""
    if not stamp:
        return 0.0
    t = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


@pytest.fixture
def data(tmp_path) -> Path:
    return write_ping_pong(tmp_path / "ping.jsonl")


@pytest.fixture
def session(hub_factory, tmp_path):
    root = tmp_path / "session"
    root.mkdir()
    root.chmod(0o755)
    token = secrets.token_hex(16)
    hub = hub_factory(extra_config=HUB_CONFIG.format(
        home=str(root / "users" / "{username}"), token=token))
    hub.start()
    s = Session(hub, token, root)
    yield s
    s.stop_culler()
    # the hub's fixture stops the hub; a server it still lists stops first, with its runs
    if s.hub.proc is not None and s.server() is not None:
        s.hub.api("DELETE", f"/users/{USER}/server")
        s.hub.wait_for_stopped(USER, timeout=120)


@pytest.mark.timeout(900)  # the run's 1500 steps take minutes on a busy machine
def test_the_culler_leaves_a_stepping_session_and_culls_it_once_the_run_ended(
        session, tiny_model, data):
    session.start_server()
    session.start_culler(f"--timeout={TIMEOUT}", f"--cull-every={CULL_EVERY}")
    # ≈ 75 s of steps here (20 steps/s on one CPU core): well over the timeout, on a machine
    # twice as fast too
    out = session.start_run(tiny_model, data, "busy", max_steps=1500, lr=1e-3, seq_len=64,
                            save_steps=500)
    last_request = time.time()  # nothing reaches the user's server after this

    # the session survives, while the run steps, what would cull an idle one
    survived = 0.0
    hub_saw = 0.0  # the latest activity the hub had for the server
    deadline = time.monotonic() + 600
    while True:
        ended = [e for e in events(out) if e.get("event") in ("done", "interrupted")]
        server = session.server()
        if server is None or (ended and ended[0]["event"] == "interrupted"):
            steps = [e["step"] for e in events(out) if e.get("event") == "step"]
            pytest.fail(f"the session was stopped while the run was stepping (step {steps[-1:]}, "
                        f"{time.time() - last_request:.0f}s after the last request)\n"
                        f"{session.log_tail()}")
        if ended:
            break
        survived = time.time() - last_request
        hub_saw = max(hub_saw, hub_time(server.get("last_activity")))
        assert time.monotonic() < deadline, f"the run did not end\n{session.log_tail()}"
        time.sleep(0.5)
    run_ended = time.time()
    assert survived > TIMEOUT + 3 * CULL_EVERY, (
        f"the run ended {survived:.0f}s after it started: too soon to show anything "
        f"(raise max_steps)\n{session.log_tail()}")
    # ... because the hub heard of the run's work, long after the last request
    assert hub_saw - last_request > TIMEOUT / 2, (hub_saw, last_request, session.log_tail())
    assert not [line for line in session.culler_lines() if "Culling server" in line]

    # the run finished: its adapter is there
    done = [e for e in events(out) if e.get("event") == "done"]
    assert done and done[0]["step"] == 1500, session.log_tail()
    assert (out / "aifab-run.json").is_file() and (out / "adapter_model.safetensors").is_file()

    # then, with nobody at the browser and nothing running, the culler stops the session
    bound = TIMEOUT + 2 * CULL_EVERY + 20  # the last check's jitter, the hub's delays
    wait_for("the ended session culled", lambda: session.server() is None, bound, session)
    culled_after = time.time() - run_ended
    culled = [line for line in session.culler_lines() if "Culling server" in line]
    assert culled and USER in culled[0], session.log_tail()
    print(f"survived {survived:.0f}s without a request while the run stepped; culled "
          f"{culled_after:.0f}s after the run ended (timeout {TIMEOUT}s): {culled[0]}")


def test_a_session_culled_anyway_leaves_its_run_a_checkpoint_to_resume(
        session, tiny_model, data):
    """--max-age culls even an active session: the run saves a checkpoint as it stops."""
    from aifab.extension.trainer import latest_complete_checkpoint

    session.start_server()
    out = session.start_run(tiny_model, data, "long", max_steps=100_000, lr=1e-3,
                            seq_len=64, save_steps=100_000)
    wait_for("the run stepping", lambda: len(
        [e for e in events(out) if e.get("event") == "step"]) >= 5, 180, session, 0.2)
    session.start_culler("--timeout=3600", f"--cull-every={CULL_EVERY}", "--max-age=1")
    # stopping: the server stops its kernels, then its services; a run has 6 x stop_grace
    wait_for("the session culled", lambda: session.server() is None, 120, session)
    culled = [line for line in session.culler_lines() if "Culling server" in line]
    assert culled and "age:" in culled[0], session.log_tail()

    stopped = [e for e in events(out) if e.get("event") == "interrupted"]
    assert stopped and stopped[0]["reason"] == "SIGTERM", session.log_tail()
    step = stopped[0]["step"]
    assert 5 <= step < 100_000
    ckpt = out / "checkpoints" / f"checkpoint-{step}"
    assert (ckpt / "aifab-complete").is_file(), session.log_tail()
    assert latest_complete_checkpoint(out / "checkpoints") == ckpt  # what --resume takes
    assert not (out / "aifab-run.json").exists()  # not finished: resumable
    left = [p.pid for p in psutil.process_iter(["cmdline"])
            if str(out) in " ".join(p.info["cmdline"] or [])]
    assert not left, f"the run's processes outlived the session: {left}"
    records = list(Path(session.root, "users").glob("**/sessions/*/long/record.json"))
    assert len(records) == 1, records
    record = json.loads(records[0].read_text())
    assert record["status"] in ("stopped", "failed") and record["output"] == str(out)
    print(f"culled by age at step {step}: {ckpt} (record: {record['status']} "
          f"{record.get('error', '')!r})")
