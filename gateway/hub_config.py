"""``add_models_service(c, ...)``: the hub config of the ``aifab-models`` service, in one call.

It declares the custom scopes, the managed service and the role of its own token
(``read:users:groups``: the gateway asks the hub which groups a caller is in), lets every
user publish their own models (``custom:aifab-models:publish!user`` in the ``user`` role) and
gives the sessions' token (``$JUPYTERHUB_API_TOKEN``: the kernel's, too) the two scopes, so
that ``aifab.client()`` and ``%serve --share`` work with no token handed around. Who may use
whose models is the site's choice, in roles of its own; docs/workshop.md shows them.
"""

from __future__ import annotations

import json
import sys

SERVICE = "aifab-models"
SCOPE_USE = "custom:aifab-models:use"
SCOPE_PUBLISH = "custom:aifab-models:publish"
# the scopes of the server token by default (JupyterHub's 'server' role) plus ours
SERVER_TOKEN_SCOPES = ["users:activity!user", "access:servers!server", SCOPE_USE,
                       f"{SCOPE_PUBLISH}!user"]


def add_models_service(c, *, state_dir: str, port: int = 8182, host: str = "127.0.0.1",
                       limits: dict | None = None,
                       auth_cache_seconds: int = 60, max_body: int = 256 * 1024,
                       proxy_url: str | None = None, python: str = sys.executable,
                       deploy: dict | None = None) -> None:
    """Add the gateway to a hub config ``c``.

    ``state_dir``: its registry and usage log (kept across restarts); ``host``, ``port``:
    where it listens (the hub's proxy sends ``/services/aifab-models/`` there: loopback when
    the proxy runs beside the hub, the hub pod's address in Kubernetes);
    ``limits``: ``{"default": {"concurrency": 8, "tokens_per_minute": 100000}, "groups":
    {"class": {...}}}``; ``auth_cache_seconds``: how long a token's scopes and a user's groups
    are trusted once looked up (a revoked grant lasts that long); ``proxy_url``: where the
    gateway reaches the hub's proxy (default: the origin of ``c.JupyterHub.public_url``);
    ``deploy``: where deployments' replicas run, ``aifab.gateway.deployments.DeploySettings``
    (``{"partition": "gh200", "slurm_conf": ..., "dir": "{home}/.aifab/deployments"}``;
    None: this hub runs no deployments)."""
    from .deployments import DeploySettings
    from .limits import parse_limits

    parse_limits(limits or {})  # bad limits stop the hub's start, with the reason
    DeploySettings.from_json(json.dumps(deploy) if deploy else "")  # so do bad settings
    c.JupyterHub.custom_scopes = {
        **_given(c.JupyterHub, "custom_scopes", {}),
        SCOPE_USE: {"description": "Call the models that a user published (filter: "
                                   "!user=OWNER)."},
        SCOPE_PUBLISH: {"description": "Publish and withdraw models, read their usage log."},
    }
    env = {"AIFAB_MODELS_STATE": str(state_dir),
           "AIFAB_MODELS_AUTH_CACHE": str(auth_cache_seconds),
           "AIFAB_MODELS_MAX_BODY": str(max_body),
           "AIFAB_MODELS_LIMITS": json.dumps(limits or {})}
    if proxy_url:
        env["AIFAB_MODELS_PROXY_URL"] = proxy_url
    if deploy:
        env["AIFAB_MODELS_DEPLOY"] = json.dumps(deploy)
    services = [s for s in _given(c.JupyterHub, "services", []) if s.get("name") != SERVICE]
    c.JupyterHub.services = services + [{
        "name": SERVICE,
        "url": f"http://{host}:{port}",
        "command": [python, "-m", "aifab.gateway"],
        "environment": env,
        # a browser's login (the hub's OAuth cookie) carries the same scopes as a token
        "oauth_client_allowed_scopes": [SCOPE_USE, SCOPE_PUBLISH],
        "oauth_no_confirm": True,
    }]
    roles = [r for r in _given(c.JupyterHub, "load_roles", [])
             if r.get("name") != f"{SERVICE}-service"]
    roles.append({"name": f"{SERVICE}-service", "services": [SERVICE],
                  "scopes": ["read:users:groups", "read:users:name"]})
    # every user publishes their own models: add to the 'user' role (the site's, if set)
    user_role = next((r for r in roles if r.get("name") == "user"), None)
    if user_role is None:
        user_role = {"name": "user", "scopes": ["self"]}
        roles.append(user_role)
    # ... and may log in to the gateway with the hub's OAuth (a browser): what a caller may
    # use is still the custom scopes' business
    for scope in (f"{SCOPE_PUBLISH}!user", f"access:services!service={SERVICE}"):
        if scope not in user_role["scopes"]:
            user_role["scopes"] = [*user_role["scopes"], scope]
    c.JupyterHub.load_roles = roles
    current = _given(c.Spawner, "server_token_scopes", [])
    c.Spawner.server_token_scopes = sorted(set(current) | set(SERVER_TOKEN_SCOPES))


def _given(section, name: str, default):
    """A config value the config set before, else ``default`` (an unset one is traitlets'
    placeholder, not a list)."""
    return section[name] if name in section else default
