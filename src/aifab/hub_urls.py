"""Where a session finds the hub's ``aifab-models`` gateway (``aifab.gateway``): both the
server (publishing) and the kernel (``aifab.client()``) ask here."""

from __future__ import annotations

import os
from urllib.parse import urlparse

ENV_MODELS_URL = "AIFAB_MODELS_URL"


def models_url(env=os.environ) -> str:
    """``$AIFAB_MODELS_URL``, else the hub's public origin and base URL with
    ``services/aifab-models/`` (JupyterHub gives a session ``JUPYTERHUB_PUBLIC_URL``). Ends in
    '/'. ValueError where neither is known (a session without a hub)."""
    if env.get(ENV_MODELS_URL):
        return env[ENV_MODELS_URL].rstrip("/") + "/"
    public = env.get("JUPYTERHUB_PUBLIC_URL") or env.get("JUPYTERHUB_PUBLIC_HUB_URL")
    if not public:
        raise ValueError("this session knows no hub to reach the models gateway through: set "
                         f"{ENV_MODELS_URL} (e.g. https://hub.example.org/services/"
                         "aifab-models/) or start it from a hub with c.JupyterHub.public_url")
    u = urlparse(public)
    base = "/" + env.get("JUPYTERHUB_BASE_URL", "/").strip("/")
    return f"{u.scheme}://{u.netloc}{base.rstrip('/')}/services/aifab-models/"
