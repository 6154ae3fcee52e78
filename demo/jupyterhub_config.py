"""The demo hub of `make demo`: JupyterHub on http://127.0.0.1:8000 with PlacementSpawner and
its embedded default profile (a session on this machine).

Environment: AIFAB_DEMO_STATE (default ./demo-state) holds the database, the password
(``demo-state/password``) and the users' directories; AIFAB_DEMO_PORT (default 8000) moves
the hub's public port, and its API ports with it (PORT+81 for the hub's API, PORT+1 for the
proxy's), so two demos with different ports do not clash.

The demo is single-user in one respect that matters: every session runs as the Unix user that
started the hub, so everyone who logs in can read everyone's files. For a class on a shared
machine use the recipe in docs/workshop.md.
"""

import os
import secrets
import shutil
import sys
from pathlib import Path

import yaml

from aifab.gateway import add_models_service
from aifab.spawners import use_placement_spawner
from aifab.spawners.discover import discover_slurm_profiles

c = get_config()  # noqa: F821 - provided by JupyterHub

HERE = Path(__file__).resolve().parent
STATE = Path(os.environ.get("AIFAB_DEMO_STATE", HERE.parent / "demo-state")).resolve()
PORT = int(os.environ.get("AIFAB_DEMO_PORT", "8000"))
STATE.mkdir(parents=True, exist_ok=True)

# A class-style shared password (JupyterHub's own SharedPasswordAuthenticator), made once.
password_file = STATE / "password"
if not password_file.exists():
    password_file.write_text(secrets.token_urlsafe(9))
    password_file.chmod(0o600)
password = password_file.read_text().strip()

c.JupyterHub.bind_url = f"http://127.0.0.1:{PORT}"
# the servers' browser-facing address (JUPYTERHUB_PUBLIC_URL): the widgets' "browser / curl"
# line and `llm.public_url` need it
c.JupyterHub.public_url = f"http://127.0.0.1:{PORT}"
c.JupyterHub.hub_ip = "127.0.0.1"
# 8000 → 8081 and 8001 as JupyterHub's defaults, but following AIFAB_DEMO_PORT
c.JupyterHub.hub_port = PORT + 81
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{PORT + 1}"
c.JupyterHub.db_url = f"sqlite:///{STATE / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(STATE / "jupyterhub_cookie_secret")
c.ConfigurableHTTPProxy.pid_file = str(STATE / "proxy.pid")
c.ConfigurableHTTPProxy.command = [str(Path(sys.prefix) / "bin" / "configurable-http-proxy")]
c.JupyterHub.authenticator_class = "shared-password"
c.SharedPasswordAuthenticator.user_password = password
c.Authenticator.allow_all = True

# The embedded default (this machine), plus one profile per partition of a Slurm this machine
# can reach (set AIFAB_DEMO_SLURM=0 to leave them out).
profiles = yaml.safe_load((HERE.parent / "docs/examples/demo-profiles.yaml").read_text())
profiles = profiles["profiles"]
# the models `make demo` built, shared by every session of this machine, like a workshop's
# read-only model cache: `%serve tiny-llama` finds it by name
for profile in profiles:
    if profile["backend"] == "local":
        profile["model_cache"] = str(STATE / "models")
if os.environ.get("AIFAB_DEMO_SLURM", "1") != "0":
    profiles += discover_slurm_profiles()
use_placement_spawner(c, profiles=profiles)
BIN = Path(sys.prefix) / "bin"
c.SlurmSessionSpawner.cmd = [str(BIN / "jupyterhub-singleuser")]
c.SlurmSessionSpawner.batchspawner_singleuser_cmd = str(BIN / "aifab-singleuser")
c.SlurmSessionSpawner.ip = "127.0.0.1"  # the demo's Slurm is this machine
# a class pressing Start together: ten start at once, the others are told their place in line
# (JupyterHub's own concurrent_spawn_limit would refuse them with 429 instead)
c.PlacementSpawner.concurrent_starts = 10
c.JupyterHub.concurrent_spawn_limit = 200
# newcomers land in the tutorials (docs/notebooks, copied into each user's folder)
c.Spawner.default_url = "/lab/tree/tutorials/01-my-session.ipynb"
c.Spawner.environment = {
    # where `make demo` built the offline tiny model, for the README and the tutorials
    "AIFAB_TINY_MODEL": str(STATE / "models" / "tiny-llama"),
    # the demo's Slurm is this machine: dask workers reach the scheduler on loopback
    "AIFAB_DASK_INTERFACE": "lo",
}
# Published models (%serve --share, aifab.client()): the hub's aifab-models gateway. In the
# demo everyone who logs in is in the group "class", and the class may use the models that the
# user "instructor" publishes (tutorial 6; docs/workshop.md has a class's real roles).
add_models_service(c, state_dir=str(STATE / "aifab-models"),
                   port=int(os.environ.get("AIFAB_DEMO_MODELS_PORT", PORT + 182)),
                   limits={"default": {"concurrency": 8, "tokens_per_minute": 100_000}})
c.Authenticator.manage_groups = True


def join_the_class(authenticator, handler, auth_model):
    auth_model["groups"] = ["class"]
    return auth_model


c.Authenticator.post_auth_hook = join_the_class
c.JupyterHub.load_roles = [*c.JupyterHub.load_roles, {
    "name": "class-uses-instructor", "groups": ["class"],
    "scopes": ["custom:aifab-models:use!user=instructor"]}]
c.LocalSessionSpawner.home_dir_template = str(STATE / "users" / "{username}")
TUTORIALS = HERE.parent / "docs" / "notebooks"


def copy_tutorials(spawner):
    """Give a new user the tutorials (a user's own edits are never overwritten)."""
    home = Path(c.LocalSessionSpawner.home_dir_template.format(username=spawner.user.name))
    target = home / "tutorials"
    target.mkdir(parents=True, exist_ok=True)
    for notebook in sorted(TUTORIALS.glob("*.ipynb")):
        if not (target / notebook.name).exists():
            shutil.copy(notebook, target / notebook.name)


c.Spawner.pre_spawn_hook = copy_tutorials

partitions = ", ".join(p["slurm"]["partition"] for p in profiles if p["backend"] == "slurm")
slurm_note = (f"  Slurm partitions offered: {partitions} (log in with a Unix user name to use "
              "them)\n" if partitions else "")
print(
    f"\n  jupyter-aifab demo hub: open http://127.0.0.1:{PORT}\n{slurm_note}"
    f"  log in with any user name and the password: {password}\n"
    f"  (the password is in {password_file}; stop with Ctrl-C; state in {STATE})\n"
    "  note: single-user demo: every session runs as this Unix user and can read the\n"
    "  others' files; for a class see docs/workshop.md\n",
    file=sys.stderr,
)
