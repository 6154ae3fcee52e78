"""The hub endpoint a batch job calls to report its port: ``POST /hub/api/batchspawner``.

batchspawner registers a handler there that ``setattr``s *any* attribute named in the POST
body on the spawner, so a job (which holds the user's token) could set ``cmd`` or
``batch_script``. We replace it with one that accepts exactly ``{"port": <1024-65535>}`` and
nothing else; the spawner (PlacementSpawner) forwards the port to its child.
"""

from __future__ import annotations

import json

from jupyterhub.apihandlers import APIHandler
from tornado import web

PATH = r"/api/batchspawner"


class PortAPIHandler(APIHandler):
    @web.authenticated
    def post(self) -> None:
        token = self.get_auth_token()
        # a service's token has no spawners: refused like any token that is no server's
        spawners = getattr(self.current_user, "spawners", {})
        spawner = next((s for s in spawners.values() if s.api_token == token), None)
        if spawner is None:
            raise web.HTTPError(403, "this token belongs to no running server")
        data = self.get_json_body()
        if not isinstance(data, dict) or set(data) != {"port"}:
            raise web.HTTPError(400, 'expected exactly {"port": <integer 1024-65535>}')
        port = data["port"]
        if not isinstance(port, int) or isinstance(port, bool) or not 1024 <= port <= 65535:
            raise web.HTTPError(400, "port must be an integer between 1024 and 65535")
        spawner.port = port
        self.set_status(201)
        self.finish(json.dumps({"message": "port received"}))


def install_port_handler() -> None:
    """Put PortAPIHandler in place of batchspawner's handler in the hub's API routes.

    JupyterHub builds its routes from ``jupyterhub.apihandlers.default_handlers`` when it
    starts, after loading the config (which imports the spawner class); batchspawner adds its
    handler to that list when it is imported. Idempotent.
    """
    import batchspawner.api  # noqa: F401  (its import appends the handler we replace)
    from jupyterhub.apihandlers import default_handlers

    default_handlers[:] = [h for h in default_handlers if h[0] != PATH]
    default_handlers.append((PATH, PortAPIHandler))
