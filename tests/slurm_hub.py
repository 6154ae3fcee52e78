"""A real hub with the site example (docs/examples) on the real Slurm fixture."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import requests

from tests.harness.hub import Hub

REPO = Path(__file__).resolve().parent.parent
SITE_CONFIG = REPO / "docs" / "examples" / "jupyterhub_config.py"
BIN = Path(sys.executable).parent

# What differs from a site: the single-user server is this venv's, on loopback.
TEST_OVERRIDES = f"""
c.SlurmSessionSpawner.cmd = [{str(BIN / 'jupyterhub-singleuser')!r}]
c.SlurmSessionSpawner.batchspawner_singleuser_cmd = {str(BIN / 'aifab-singleuser')!r}
c.SlurmSessionSpawner.ip = '127.0.0.1'
c.SlurmSessionSpawner.start_timeout = 120
c.JupyterHub.authenticator_class = 'null'
"""


def make_slurm_hub(root: Path, extra: str = "") -> Hub:
    return Hub(root, config_file=SITE_CONFIG, extra_config=TEST_OVERRIDES + extra)


def ensure_unix_user(name: str) -> None:
    if subprocess.run(["id", name], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", name], check=True)


def create_hub_user(hub: Hub, name: str, groups: tuple[str, ...] = ()) -> None:
    r = hub.api("POST", f"/users/{quote(name, safe='')}")
    assert r.status_code in (201, 409), r.text
    for g in groups:
        hub.api("POST", f"/groups/{g}")
        r = hub.api("POST", f"/groups/{g}/users", json={"users": [name]})
        assert r.status_code == 200, r.text


def create_class(hub: Hub, prefix: str, n: int) -> list[str]:
    """N participants PREFIX00, PREFIX01, ...: a Unix account and a hub user each."""
    names = [f"{prefix}{i:02d}" for i in range(n)]
    for name in names:
        ensure_unix_user(name)
        create_hub_user(hub, name)
    return names


def proxied(hub: Hub, path: str) -> requests.Response:
    """A request through the proxy to a user's server, with the hub token (access:servers)."""
    return requests.get(f"{hub.url}{path}", headers={"Authorization": f"token {hub.token}"},
                        timeout=30)


def session_job(slurm, user: str) -> dict | None:
    """The user's session job in squeue, if any."""
    rows = [r for r in slurm.squeue("-u", user) if r["name"] == f"aifab-{user}"]
    return rows[0] if rows else None
