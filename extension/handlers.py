"""REST handlers of the session services, all behind the Jupyter server's own auth."""

from __future__ import annotations

import json

from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web

from aifab.session import Session, SessionContractError


class SessionHandler(APIHandler):
    """GET /aifab/api/session: placement, GPUs and walltime left of this session."""

    @web.authenticated
    def get(self) -> None:
        try:
            s = Session.from_env()
        except SessionContractError as exc:
            raise web.HTTPError(500, f"bad session contract: {exc}") from exc
        self.finish(json.dumps({
            "backend": s.backend,
            "profile": s.profile,
            "gpu_count": s.gpu_count,
            "visible_gpus": list(s.visible_gpus),
            "walltime_end": s.walltime_end,
            "walltime_left": s.walltime_left(),
            "slurm_job_id": s.slurm_job_id,
            "pod_name": s.pod_name,
            "source": s.source,
        }))


def setup_handlers(web_app) -> None:
    base = web_app.settings.get("base_url", "/")
    web_app.add_handlers(".*$", [
        (url_path_join(base, "aifab/api/session"), SessionHandler),
    ])
