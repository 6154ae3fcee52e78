"""The local backend's per-user mode (the workshop recipe on a shared machine), with a real
hub as root: each hub user's session runs as their own Unix account, made at the first start,
and one participant cannot read another's home or the hub's secrets."""

from __future__ import annotations

import pwd
import stat
import subprocess
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.hub

USERS = ("aifabwsa", "aifabwsb")
HUB_CONFIG = """
from aifab.spawners import use_placement_spawner
use_placement_spawner(c, profiles=[{"slug": "local-cpu", "display_name": "This machine",
                                    "backend": "local", "default": True}])
c.JupyterHub.authenticator_class = "null"
c.LocalSessionSpawner.run_as_user = True
c.LocalSessionSpawner.create_users = True
"""


def remove_accounts() -> None:
    for name in USERS:
        subprocess.run(["userdel", "--remove", name], capture_output=True, timeout=60)


@pytest.fixture
def hub(hub_factory):
    remove_accounts()  # the accounts are made by the hub, at the first start
    hub = hub_factory(extra_config=HUB_CONFIG)
    hub.root.chmod(0o700)  # the recipe: the hub's state folder is the hub's alone
    hub.start()
    for name in ("aifabwsa", "aifabwsb", "small", "short"):
        assert hub.api("POST", f"/users/{name}").status_code in (201, 409)
    yield hub
    for name in USERS:
        hub.api("DELETE", f"/users/{name}/server")
    for name in USERS:
        try:
            hub.wait_for_stopped(name, 60)
        except Exception:  # noqa: BLE001 - best effort before removing the accounts
            pass
    remove_accounts()


def as_user(user: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sudo", "-u", user, *argv], capture_output=True, text=True,
                          timeout=60)


def test_each_user_runs_as_their_own_account_and_cannot_read_the_others(hub):
    for name in USERS:
        assert hub.api("POST", f"/users/{name}/server").status_code in (201, 202)
    for name in USERS:
        hub.wait_for_server(name, 90)
    a, b = (pwd.getpwnam(name) for name in USERS)
    for account in (a, b):
        assert stat.S_IMODE(Path(account.pw_dir).stat().st_mode) == 0o700
        servers = [p for p in psutil.process_iter(["cmdline", "uids"])
                   if any("jupyterhub-singleuser" in x for x in p.info["cmdline"] or [])
                   and p.info["uids"].real == account.pw_uid]
        assert len(servers) == 1, f"no server running as {account.pw_name}"
        assert servers[0].environ()["HOME"] == account.pw_dir
    # the session wrote its state into its own home (Jupyter's runtime files, the services)
    assert as_user(a.pw_name, "ls", a.pw_dir).returncode == 0
    peek = as_user(a.pw_name, "ls", b.pw_dir)
    assert peek.returncode != 0 and "Permission denied" in peek.stderr
    for secret in ("cookie_secret", "jupyterhub.sqlite"):  # the hub's, not theirs to read
        assert (hub.root / secret).is_file()
        read = as_user(a.pw_name, "cat", str(hub.root / secret))
        assert read.returncode != 0 and "Permission denied" in read.stderr
