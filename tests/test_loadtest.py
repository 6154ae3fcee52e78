"""`aifab loadtest` against `make demo`'s hub: ten participants log in with the class
password at once, start a local session each, open a kernel, run one cell, stop."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "demo" / "jupyterhub_config.py"
AIFAB = Path(sys.executable).parent / "aifab"

pytestmark = [pytest.mark.hub]


@pytest.fixture
def demo_hub(hub_factory, tmp_path):
    state = tmp_path / "demo-state"
    hub = hub_factory(config_file=DEMO_CONFIG, env={"AIFAB_DEMO_STATE": str(state)})
    hub.start()
    admin = tmp_path / "admin-token"
    admin.write_text(hub.token)  # the test's service token: it may read the hub's metrics
    admin.chmod(0o600)
    return hub, state / "password", admin


def test_ten_participants_log_in_start_run_a_cell_and_stop(demo_hub):
    hub, password, admin = demo_hub
    # the demo's local profile with 1 CPU and 2 GiB each: ten of them on a 2-core machine
    done = subprocess.run(
        [str(AIFAB), "loadtest", "--hub", hub.url, "--users", "10", "--password-file",
         str(password), "--admin-token-file", str(admin), "--profile", "local-cpu",
         "--option", "cpus=1", "--option", "memory_gb=2", "--timeout", "600"],
        capture_output=True, text=True, timeout=700)
    assert done.returncode == 0, f"{done.stderr[-3000:]}\n{done.stdout}\n{hub.log_tail()}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["users"] == 10 and report["failures"] == 0, report["errors"]
    for step in ("login", "spawn", "kernel", "cell", "stop"):
        assert 0 < report[f"{step}_p50_s"] <= report[f"{step}_p95_s"], (step, report)
    assert report["hub_cpu_s"] > 0
    # local sessions ask Slurm nothing, whatever the machine has
    assert report["slurm_commands"] == {}, report["slurm_commands"]
    # every participant's session is gone again
    for i in range(1, 11):
        assert not hub.user_model(f"loadtest-{i:02d}")["servers"]
    assert hub.token not in done.stdout + done.stderr  # no token is ever printed


@pytest.mark.parametrize("args, message", [
    (["--hub", "http://192.0.2.7:8000"], "is not on loopback"),
    (["--hub", "ftp://127.0.0.1"], "is not an http(s) URL"),
    (["--hub", "http://127.0.0.1:9", "--users", "500"], "--users 500: allowed 1..200"),
    (["--hub", "http://127.0.0.1:9", "--timeout", "5"], "allowed 10..3600 s"),
    (["--hub", "http://127.0.0.1:9", "--option", "x"], "an option is NAME=VALUE"),
])
def test_bad_arguments_are_refused_with_what_is_allowed(tmp_path, args, message):
    pw = tmp_path / "pw"
    pw.write_text("x")
    done = subprocess.run([str(AIFAB), "loadtest", "--password-file", str(pw), *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr
