"""REST API and authenticated proxy of the session services. Every handler is behind the
Jupyter server's own authentication (a token, the hub's OAuth cookie); services themselves
listen on 127.0.0.1 with a random API key that only this proxy adds."""

from __future__ import annotations

import asyncio
import json
import re
import time
from urllib.parse import parse_qsl, quote, urlencode

from jupyter_server.base.handlers import APIHandler
from tornado import httpclient, web

from aifab.session import Session, SessionContractError

from .services import ServiceError, ServiceManager, tail


class _Base(APIHandler):
    @property
    def manager(self) -> ServiceManager:
        return self.settings["aifab_services"]

    def fail(self, exc: ServiceError):
        raise web.HTTPError(exc.status, str(exc).replace("%", "%%"))


class SessionHandler(_Base):
    """GET /aifab/api/session: placement, GPUs (and who holds them), walltime left."""

    @web.authenticated
    def get(self) -> None:
        try:
            s = Session.from_env()
        except SessionContractError as exc:
            raise web.HTTPError(500, f"bad session contract: {exc}") from exc
        self.finish(json.dumps({
            "backend": s.backend, "profile": s.profile, "gpu_count": s.gpu_count,
            "visible_gpus": list(s.visible_gpus), "walltime_end": s.walltime_end,
            "walltime_left": s.walltime_left(), "slurm_job_id": s.slurm_job_id,
            "pod_name": s.pod_name, "source": s.source, "gpus_held": self.manager.held(),
        }))


class ServicesHandler(_Base):
    @web.authenticated
    def get(self) -> None:
        self.finish(json.dumps([s.public() for s in self.manager.services.values()]))

    @web.authenticated
    async def post(self) -> None:
        try:
            spec = json.loads(self.request.body or b"{}")
        except ValueError:
            raise web.HTTPError(400, "the body is not JSON") from None
        if isinstance(spec, dict) and spec.get("extra_args"):
            # checking extra flags runs vLLM's --help once (seconds): not on the event loop
            await asyncio.get_running_loop().run_in_executor(None, self.manager.vllm_flags)
        try:
            svc = self.manager.create(spec)
        except ServiceError as exc:
            self.fail(exc)
        self.set_status(201)
        self.finish(json.dumps(svc.public()))


class ServiceHandler(_Base):
    @web.authenticated
    def get(self, name: str) -> None:
        try:
            self.finish(json.dumps(self.manager.get(name).public()))
        except ServiceError as exc:
            self.fail(exc)

    @web.authenticated
    async def delete(self, name: str) -> None:
        try:
            svc = await self.manager.stop(name)
        except ServiceError as exc:
            self.fail(exc)
        self.finish(json.dumps(svc.public()))


class LogsHandler(_Base):
    @web.authenticated
    def get(self, name: str) -> None:
        n = self.get_argument("n", "100")
        if not re.fullmatch(r"[0-9]{1,5}", n) or not 0 < int(n) <= 10000:
            raise web.HTTPError(400, "n: the number of lines, 1 to 10000")
        try:
            svc = self.manager.get(name)
        except ServiceError as exc:
            self.fail(exc)
        self.finish(json.dumps({"name": name, "lines": tail(svc.log_path, int(n))}))


# request headers not passed on: Jupyter's credentials stay here, the service gets its key
_DROP_REQUEST = {"host", "authorization", "cookie", "x-xsrftoken", "content-length",
                 "connection", "accept-encoding", "transfer-encoding"}
_DROP_RESPONSE = {"content-length", "transfer-encoding", "connection", "content-encoding",
                  "server", "date", "set-cookie"}  # and access-control-*: see on_header


class ProxyHandler(APIHandler):
    """/aifab/proxy/NAME/PATH → http://127.0.0.1:PORT/PATH with the service's API key.

    Responses are streamed chunk by chunk (server-sent events of a streaming completion
    arrive as vLLM writes them). An APIHandler: a request without Jupyter's auth gets 403,
    not a redirect to a login page."""

    @property
    def manager(self) -> ServiceManager:
        return self.settings["aifab_services"]

    @web.authenticated
    async def _proxy(self, name: str, path: str) -> None:
        try:
            svc = self.manager.get(name)
        except ServiceError as exc:
            raise web.HTTPError(exc.status, str(exc).replace("%", "%%")) from None
        if svc.status not in ("starting", "ready"):
            raise web.HTTPError(503, f"service {name!r} is {svc.status}")
        if not (svc.socket or svc.port):
            raise web.HTTPError(404, f"service {name!r} serves nothing to proxy to")
        # Jupyter's ?token= stays here; the rest of the query goes on
        params = [(k, v) for k, v in parse_qsl(self.request.query, keep_blank_values=True)
                  if k != "token"]
        query = f"?{urlencode(params)}" if params else ""
        headers = {k: v for k, v in self.request.headers.get_all()
                   if k.lower() not in _DROP_REQUEST}
        headers["Authorization"] = f"Bearer {svc.api_key}"
        body = self.request.body if self.request.method in ("POST", "PUT", "PATCH") else None
        started = False

        def on_header(line: str) -> None:
            nonlocal started
            line = line.strip()
            if line.startswith("HTTP/"):
                self.set_status(int(line.split()[1]))
            elif ":" in line:
                k, v = line.split(":", 1)
                key = k.strip().lower()
                if key not in _DROP_RESPONSE and not key.startswith("access-control-"):
                    self.set_header(k.strip(), v.strip())

        def on_chunk(chunk: bytes) -> None:
            nonlocal started
            started = True
            self.write(chunk)
            self.flush()

        request = httpclient.HTTPRequest(
            f"{self.manager.base_url(svc)}/{quote(path, safe='/:@!$&()*+,;=-._~')}{query}",
            method=self.request.method,
            headers=headers, body=body, header_callback=on_header,
            streaming_callback=on_chunk, request_timeout=3600, decompress_response=False,
            allow_nonstandard_methods=True, follow_redirects=False)
        t0 = time.monotonic()
        try:
            await self.manager.http_client(svc).fetch(request, raise_error=False)
        except (OSError, httpclient.HTTPClientError) as exc:
            if not started:
                raise web.HTTPError(502, f"service {name!r} is not answering: "
                                         f"{str(exc).replace('%', '%%')}") from None
            self.log.warning("aifab proxy: %s/%s broke off: %s", name, path, exc)
        self.log.debug("aifab proxy %s %s/%s in %.3fs", self.request.method, name, path,
                       time.monotonic() - t0)
        self.finish()

    get = post = put = delete = patch = _proxy


def handlers() -> list[tuple]:
    name = r"(?P<name>[a-z0-9][a-z0-9-]{0,39})"
    return [
        (r"/aifab/api/session", SessionHandler),
        (r"/aifab/api/services", ServicesHandler),
        (rf"/aifab/api/services/{name}", ServiceHandler),
        (rf"/aifab/api/services/{name}/logs", LogsHandler),
        (rf"/aifab/proxy/{name}/(?P<path>.*)", ProxyHandler),
    ]
