"""REST API and authenticated proxy of the session services. Every handler is behind the
Jupyter server's own authentication (a token, the hub's OAuth cookie); services themselves
listen on a private Unix socket (or 127.0.0.1) with a random API key that only the proxy
(``proxy.py``) adds."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
from pathlib import Path

from jupyter_server.base.handlers import APIHandler
from tornado import web
from tornado.log import access_log

from aifab.api import ApiError
from aifab.names import SERVICE_NAME_ROUTE
from aifab.session import Session, SessionContractError

from . import panel
from .proxy import ServiceProxyHandler
from .records import tail
from .services import ServiceManager


class AifabAPIHandler(APIHandler):
    """What every REST handler of the session has: errors with their HTTP status, a JSON
    body read or refused with 400."""

    def fail(self, exc: ApiError):
        # tornado %-formats the message: escape what came from the request
        raise web.HTTPError(exc.http_status, str(exc).replace("%", "%%")) from None

    def json_body(self):
        try:
            return json.loads(self.request.body or b"{}")
        except ValueError:
            raise web.HTTPError(400, "the body is not JSON") from None


class _Base(AifabAPIHandler):
    @property
    def manager(self) -> ServiceManager:
        return self.settings["aifab_services"]


class SessionHandler(_Base):
    """GET /aifab/api/session: placement, GPUs (and who holds them), walltime left."""

    @web.authenticated
    def get(self) -> None:
        try:
            s = Session.from_env()
        except SessionContractError as exc:
            raise web.HTTPError(500, f"bad session contract: {exc}") from exc
        gpu_usage, gpu_usage_note = panel.gpu_usage(s.visible_gpus)  # NVML, where there is one
        self.finish(json.dumps({
            "backend": s.backend, "profile": s.profile, "gpu_count": s.gpu_count,
            "visible_gpus": list(s.visible_gpus), "walltime_end": s.walltime_end,
            "walltime_left": s.walltime_left(), "slurm_job_id": s.slurm_job_id,
            "pod_name": s.pod_name, "source": s.source, "gpus_held": self.manager.held(),
            # for the JupyterLab panel: the placement in words, the browser's address
            "placement": panel.placement(s, socket.gethostname()),
            "public_url": panel.public_url(os.environ),
            "gpu_usage": gpu_usage, "gpu_usage_note": gpu_usage_note,
        }))


class _Creating(_Base):
    async def create(self, spec) -> None:
        try:
            checked = None
            if self.manager.needs_slow_validation(spec):
                # reading a data set or vLLM's --help takes seconds: not on the event loop
                checked = await asyncio.get_running_loop().run_in_executor(
                    None, self.manager.validate, spec)
            svc = self.manager.create(spec, checked)
        except ApiError as exc:
            self.fail(exc)
        self.set_status(201)
        self.finish(json.dumps(svc.public()))


class ServicesHandler(_Creating):
    @web.authenticated
    def get(self) -> None:
        self.finish(json.dumps([s.public() for s in self.manager.services.values()]))

    @web.authenticated
    async def post(self) -> None:
        await self.create(self.json_body())


class ResumeHandler(_Creating):
    """POST /aifab/api/services/NAME/resume: an ended fine-tune run continues from its last
    checkpoint with the options it was started with (the panel's Resume)."""

    @web.authenticated
    async def post(self, name: str) -> None:
        try:
            spec = self.manager.resume_request(name)
        except ApiError as exc:
            self.fail(exc)
        await self.create(spec)


class ServiceHandler(_Base):
    @web.authenticated
    def get(self, name: str) -> None:
        try:
            self.finish(json.dumps(self.manager.get(name).public()))
        except ApiError as exc:
            self.fail(exc)

    @web.authenticated
    async def delete(self, name: str) -> None:
        try:
            svc = await self.manager.stop(name)
        except ApiError as exc:
            self.fail(exc)
        if svc.published:  # a stopped service leaves the models gateway
            from .publishing import withdraw

            try:
                await withdraw(svc)
            except web.HTTPError as exc:
                self.log.warning("aifab: %s stopped, but withdrawing it failed: %s", name,
                                 exc.log_message)
        self.finish(json.dumps(svc.public()))


class LogsHandler(_Base):
    @web.authenticated
    def get(self, name: str) -> None:
        n = self.get_argument("n", "100")
        if not re.fullmatch(r"[0-9]{1,5}", n) or not 0 < int(n) <= 10000:
            raise web.HTTPError(400, "n: the number of lines, 1 to 10000")
        try:
            svc = self.manager.get(name)
        except ApiError as exc:
            self.fail(exc)
        self.finish(json.dumps({"name": name, "lines": tail(svc.log_path, int(n))}))


class ProgressHandler(_Base):
    """GET /aifab/api/services/NAME/progress: a fine-tune run's progress for the panel."""

    @web.authenticated
    def get(self, name: str) -> None:
        try:
            svc = self.manager.get(name)
        except ApiError as exc:
            self.fail(exc)
        if not svc.output:
            raise web.HTTPError(400, f"{name!r} is a {svc.kind} service, not a fine-tune run")
        # the tail is enough: the summary needs this attempt's steps, not a week of them
        lines = tail(Path(svc.output) / "metrics.jsonl", 5000)
        # a LoRA run's result is an adapter (served on its base model), a full run's a model
        adapter = (Path(svc.output) / "adapter_config.json").is_file()
        self.finish(json.dumps({"name": name, **panel.run_progress(lines), "adapter": adapter}))


def quiet_polls(log_function, log):
    """Tornado's ``log_function`` with the widgets' polls (successful GETs of the REST API,
    once a second per widget) at DEBUG: in a workshop they were a third of the server's log.
    Everything else is logged as before."""

    def log_request(handler) -> None:
        if isinstance(handler, AifabAPIHandler) and handler.request.method == "GET" \
                and handler.get_status() < 400:
            # the path only: a query may hold ?token=
            log.debug("%d GET %s (%.1f ms)", handler.get_status(), handler.request.path,
                      1000.0 * handler.request.request_time())
            return
        if log_function is not None:
            log_function(handler)
        else:  # what tornado logs without a log_function
            access_log.info("%d %s %.2fms", handler.get_status(), handler._request_summary(),
                            1000.0 * handler.request.request_time())

    return log_request


def handlers() -> list[tuple]:
    name = f"(?P<name>{SERVICE_NAME_ROUTE})"
    return [
        (r"/aifab/api/session", SessionHandler),
        (r"/aifab/api/services", ServicesHandler),
        (rf"/aifab/api/services/{name}", ServiceHandler),
        (rf"/aifab/api/services/{name}/logs", LogsHandler),
        (rf"/aifab/api/services/{name}/progress", ProgressHandler),
        (rf"/aifab/api/services/{name}/resume", ResumeHandler),
        (rf"/aifab/proxy/{name}/(?P<path>.*)", ServiceProxyHandler),
    ]
