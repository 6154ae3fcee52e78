"""Publishing a session's vLLM service to the hub's ``aifab-models`` gateway.

``POST /aifab/api/services/NAME/publish {"groups": [...]}`` (what ``%serve --share`` and
``handle.publish()`` call) makes a key for the service, registers it with the gateway under
``USER/NAME`` with the session's own hub token, and from then on answers the gateway on
``/aifab/published/NAME/``: ``health`` (for the router's checks) and the four OpenAI routes
(chat/completions, completions, embeddings, models), each only with that key. Nothing else of
vLLM's is reachable there, and the request reaches vLLM with vLLM's own key, as through the
session's proxy. ``DELETE`` on the same path withdraws it; stopping the service or the session
withdraws it too. A publication lives and dies with the session.
"""

from __future__ import annotations

import json
import os
import secrets

from jupyter_server.auth.decorator import allow_unauthenticated
from tornado import httpclient, web

from aifab import hub_urls, signing
from aifab.api import ApiError
from aifab.names import HUB_GROUP, HUB_GROUP_RULE, SERVICE_NAME_ROUTE

from .handlers import _Base
from .proxy import ServiceProxyHandler

PUBLISHED_ROUTES = r"health|v1/models|v1/chat/completions|v1/completions|v1/embeddings"


def models_url() -> str:
    try:
        return hub_urls.models_url()
    except ValueError as exc:
        raise web.HTTPError(409, str(exc)) from None


async def _gateway(method: str, path: str, body: dict | None = None) -> dict:
    """A call to the gateway with this session's hub token (never a caller's)."""
    token = os.environ.get("JUPYTERHUB_API_TOKEN", "")
    if not token:
        raise web.HTTPError(409, "this session has no hub token to publish with")
    try:
        r = await httpclient.AsyncHTTPClient().fetch(
            models_url() + path, method=method, raise_error=False, request_timeout=30,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            body=json.dumps(body) if body is not None else None)
    except OSError as exc:
        raise web.HTTPError(502, f"the models gateway does not answer: {exc}") from None
    if r.code >= 400:
        try:
            message = json.loads(r.body)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.reason
        raise web.HTTPError(r.code if r.code < 500 else 502,
                            f"the models gateway says: {message}".replace("%", "%%"))
    return json.loads(r.body) if r.body else {}


async def withdraw(svc) -> None:
    """Take the service off the gateway (it stopped, or the owner asked)."""
    if not svc.published:
        return
    owner, name = svc.published["id"].split("/", 1)
    try:
        await _gateway("DELETE", f"api/models/{owner}/{name}")
    except web.HTTPError as exc:
        if exc.status_code != 404:
            raise
    svc.published = {}
    svc.save()


class PublishHandler(_Base):
    """POST publishes the service NAME to the groups; DELETE withdraws it."""

    @web.authenticated
    async def post(self, name: str) -> None:
        try:
            svc = self.manager.get(name)
        except ApiError as exc:
            self.fail(exc)
        body = self.json_body()
        groups = body.get("groups") if isinstance(body, dict) else None
        if not isinstance(body, dict) or set(body) - {"groups"} or not isinstance(
                groups, list) or not groups or not all(
                isinstance(g, str) and HUB_GROUP.fullmatch(g) for g in groups):
            raise web.HTTPError(400, f"publish takes {{\"groups\": [...]}}: each "
                                     f"{HUB_GROUP_RULE}")
        if svc.kind != "vllm":
            raise web.HTTPError(400, f"{name!r} is a {svc.kind} service; only a served model "
                                     "(vllm) is published")
        if svc.status.value not in ("starting", "ready"):
            raise web.HTTPError(409, f"{name!r} is {svc.status.value}: start it first")
        key = svc.published.get("key") or secrets.token_urlsafe(32)
        record = await _gateway("POST", "api/models", {
            "name": name, "served_name": svc.served_name, "key": key, "groups": groups,
            "server_name": os.environ.get("JUPYTERHUB_SERVER_NAME", "")})
        svc.published = {"id": record["id"], "groups": record["groups"], "key": key}
        svc.save()
        self.finish(json.dumps({**record, "url": models_url() + "v1"}))

    @web.authenticated
    async def delete(self, name: str) -> None:
        try:
            svc = self.manager.get(name)
        except ApiError as exc:
            self.fail(exc)
        if not svc.published:
            raise web.HTTPError(404, f"{name!r} is not published")
        await withdraw(svc)
        self.finish(json.dumps(svc.public()))


class PublishedRouteHandler(ServiceProxyHandler):
    """/aifab/published/NAME/ROUTE → the service, for the gateway only: instead of Jupyter's
    login, a signature made with the publication's key (``aifab.gateway.signing``: the time
    and the route, valid for a minute), checked in constant time. The key itself never
    travels: the router in between has no credentials of its own, and a request it passes on
    is good for its route for a minute only.

    ``health`` needs no signature (vLLM's /health says only whether it is up, and the router
    checks it without credentials) and, unlike a call, does not count as the session's
    activity: the router's checks every few seconds must not keep an idle session alive."""

    async def prepare(self) -> None:
        self.current_user = self._jupyter_current_user = None  # nobody of Jupyter's
        name, path = self.path_kwargs["name"], self.path_kwargs["path"]
        svc = self.settings["aifab_services"].services.get(name)
        key = svc.published.get("key", "") if svc is not None else ""
        if not key:
            raise web.HTTPError(404, f"{name!r} is not published")
        if path != "health" and not signing.verify(
                key, "/" + path, self.request.headers.get("Authorization", "")):
            raise web.HTTPError(401, "this route answers the models gateway only")
        self.svc = self._service(name)

    def _record_activity(self):
        if self.path_kwargs.get("path") != "health":
            super()._record_activity()

    def _done(self) -> None:
        if self.path_kwargs.get("path") != "health":
            super()._done()

    def check_xsrf_cookie(self):
        return  # no cookie is read here: the key is the credential

    http_get = allow_unauthenticated(ServiceProxyHandler.http_get)
    post = allow_unauthenticated(ServiceProxyHandler.post)

    def _refuse(self, *args, **kwargs):
        raise web.HTTPError(405)

    put = delete = patch = head = options = _refuse

    async def open(self, *args, **kwargs):
        self.close(1008, "no websockets here")


def handlers() -> list[tuple]:
    name = f"(?P<name>{SERVICE_NAME_ROUTE})"
    return [
        (rf"/aifab/api/services/{name}/publish", PublishHandler),
        (rf"/aifab/published/{name}/(?P<path>{PUBLISHED_ROUTES})", PublishedRouteHandler),
    ]
