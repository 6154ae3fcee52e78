"""`make demo` on a machine without Slurm: its install path needs no Slurm command, a second
run installs nothing, the torch it runs on is the CPU build, and the demo hub it starts (on
ports of its own, derived from AIFAB_DEMO_PORT) shows its login page."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
SLURM_COMMANDS = {"sbatch", "squeue", "sinfo", "scancel", "scontrol", "srun", "salloc",
                  "sacct", "sacctmgr", "sstat", "slurmctld", "slurmd", "slurmdbd", "munged"}

pytestmark = pytest.mark.hub


def path_without_slurm(shim: Path) -> str:
    """A PATH with every program of this machine's PATH except Slurm's and munge's."""
    shim.mkdir()
    for folder in os.environ["PATH"].split(os.pathsep) + ["/usr/sbin", "/sbin"]:
        if not os.path.isdir(folder):
            continue
        for entry in os.scandir(folder):
            target = shim / entry.name
            if entry.name in SLURM_COMMANDS or target.exists():
                continue
            target.symlink_to(entry.path)
    return str(shim)


def free_ports() -> int:
    """A port P with P, P+1 and P+81 free (the demo's public, proxy API and hub ports)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 81 > 65535:
            continue
        try:
            for p in (port, port + 1, port + 81):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise AssertionError("no three free ports for the demo")


def test_the_demo_installs_and_starts_without_slurm(tmp_path, tiny_model):
    path = path_without_slurm(tmp_path / "bin")
    env = {**os.environ, "PATH": path}
    assert subprocess.run(["sh", "-c", "command -v sinfo sbatch squeue"], env=env,
                          capture_output=True).returncode != 0
    state = tmp_path / "demo-state"
    (state / "models").mkdir(parents=True)
    (state / "models" / "tiny-llama").symlink_to(tiny_model)  # built once for the suite

    def demo_install() -> tuple[subprocess.CompletedProcess, float]:
        t0 = time.monotonic()
        made = subprocess.run(["make", "-C", str(REPO), "demo-install",
                               f"DEMO_STATE={state}"],
                              env=env, capture_output=True, text=True, timeout=600)
        assert made.returncode == 0, made.stdout + made.stderr
        assert "slurm" not in (made.stdout + made.stderr).lower()
        return made, time.monotonic() - t0

    # `make test` installed everything; whatever the first run still finds to do (a package
    # source newer than the install), the second run finds nothing
    demo_install()
    again, seconds = demo_install()
    assert "pip install" not in again.stdout, again.stdout
    print(f"make demo-install, second run: {seconds:.1f} s")

    torch = subprocess.run([str(VENV_BIN / "python"), "-c",
                            "import torch; print(torch.__version__, torch.version.cuda)"],
                           capture_output=True, text=True, timeout=120)
    version, cuda = torch.stdout.split()
    assert cuda == "None" and version.endswith("+cpu"), torch.stdout + torch.stderr

    port = free_ports()
    log = open(tmp_path / "hub.log", "wb")  # noqa: SIM115 - the hub holds it
    hub = subprocess.Popen([str(VENV_BIN / "jupyterhub"), "-f",
                            str(REPO / "demo" / "jupyterhub_config.py")],
                           env={**env, "PATH": f"{VENV_BIN}{os.pathsep}{path}",
                                "AIFAB_DEMO_PORT": str(port), "AIFAB_DEMO_STATE": str(state)},
                           cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                           start_new_session=True)
    log.close()
    try:
        deadline, page = time.monotonic() + 90, None
        while time.monotonic() < deadline and hub.poll() is None:
            try:
                page = requests.get(f"http://127.0.0.1:{port}/hub/login", timeout=5)
                if page.status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        hub_log = (tmp_path / "hub.log").read_text(errors="replace")
        assert page is not None and page.status_code == 200, hub_log[-3000:]
        assert 'name="password"' in page.text
        # the hub's own API and the proxy's followed the public port
        assert f"127.0.0.1:{port + 81}" in hub_log and f"127.0.0.1:{port + 1}" in hub_log
        assert f"the password is in {state / 'password'}" in hub_log
        assert "Slurm partitions offered" not in hub_log  # none found without a Slurm
    finally:
        os.killpg(hub.pid, signal.SIGTERM)
        try:
            hub.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(hub.pid, signal.SIGKILL)
            hub.wait(10)
