"""The gateway's HTTP API, under ``/services/aifab-models/``.

``v1/models``, ``v1/chat/completions``, ``v1/completions``, ``v1/embeddings``: OpenAI's API for
every published model a caller may use, and nothing else of vLLM's (its /tokenize,
/invocations, /metrics, /sleep, /collective_rpc answer without a key: no route here reaches
them). ``api/models`` publishes and withdraws; ``api/usage`` is the usage log of one's own
models.

Identity is JupyterHub's: a hub token (``Authorization: Bearer``, which is what the OpenAI
SDK's ``api_key=`` sends) or the hub's OAuth cookie, through ``HubOAuth``. Permission is hub
RBAC: ``custom:aifab-models:use!user=OWNER`` to call OWNER's models (a role grants it to a
group) and ``custom:aifab-models:publish!user=OWNER`` to publish as OWNER; on top of that, a
model is visible only to the groups its owner shared it with. The caller's credentials stop
here: the request goes on with the publication's own key.
"""

from __future__ import annotations

import json
import re
import time

from jupyterhub.services.auth import HubOAuthenticated
from tornado import httpclient, web

from aifab import signing
from aifab.closable_http import OneRequestClient
from aifab.names import SERVICE_NAME, SERVICE_NAME_RULE

from .hub_config import SCOPE_PUBLISH, SCOPE_USE
from .limits import LimitError
from .registry import LABEL_KEY, OWNER, Publication, check_groups, parse_model_id

SERVED_NAME_RULE = r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}"
OPENAI_ROUTES = ("chat/completions", "completions", "embeddings")
KEY_MIN = 32


class BaseHandler(HubOAuthenticated, web.RequestHandler):
    """JSON in and out; 403 (never a login redirect) without a hub identity that holds one
    of the gateway's scopes."""

    # JupyterHub's own check (hub_scopes) asks for the unfiltered scopes, which a filtered
    # grant (!user=OWNER) does not satisfy: every hub identity passes here, and each handler
    # checks the filtered scope it needs (``prepare`` refuses one that holds none)
    hub_scopes = None
    _retry_after = 0

    @property
    def gw(self):
        return self.settings["aifab_gateway"]

    @property
    def hub_auth(self):
        return self.settings["hub_auth"]

    async def prepare(self) -> None:
        model = await self.hub_auth.get_user(self, sync=False)
        if not model and self.request.method == "GET" and \
                "text/html" in self.request.headers.get("Accept", ""):
            # a browser: the hub's login (OAuth), then back here with the hub's cookie
            self.redirect(HubOAuthenticated.get_login_url(self))
            return
        if not model:
            raise web.HTTPError(403, "a JupyterHub token is needed (Authorization: Bearer "
                                     "TOKEN, the OpenAI SDK's api_key) or the hub's login")
        model.setdefault("kind", "user")
        if not any(s.split("!", 1)[0] in (SCOPE_USE, SCOPE_PUBLISH)
                   for s in model.get("scopes", [])):
            raise web.HTTPError(403, f"{model['kind']} {_esc(model['name'])} holds no "
                                     f"{SCOPE_USE} or {SCOPE_PUBLISH} scope: ask the "
                                     "owner of a model, or the hub's admins, for a role "
                                     "that grants it")
        self._hub_auth_user_cache = model


    def write_error(self, status_code: int, **kwargs) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        message = (exc.log_message % exc.args if isinstance(exc, web.HTTPError)
                   and exc.log_message else self._reason)
        self.set_header("Content-Type", "application/json")
        if self._retry_after:  # (tornado clears the headers set before the error)
            self.set_header("Retry-After", str(self._retry_after))
        # OpenAI's error shape, so the SDK raises with the message
        self.finish(json.dumps({"error": {"message": message, "type": _error_type(status_code),
                                          "code": status_code}}))

    def publisher(self, doing: str) -> str:
        """The calling user's name, if they may publish as themselves (``publish!user=``
        THEM) and the name can own a model id; 403 or 400 otherwise."""
        user = self.current_user
        owner = user["name"]
        if user.get("kind") != "user" or not self.hub_auth.check_scopes(
                f"{SCOPE_PUBLISH}!user={owner}", user):
            raise web.HTTPError(403, f"{_esc(owner)} may not {doing}: that needs "
                                     f"{SCOPE_PUBLISH}!user={_esc(owner)}")
        if not OWNER.fullmatch(owner):
            raise web.HTTPError(400, f"the user name {_esc(owner[:80])!r} cannot own a "
                                     "model here (a model id allows letters, digits and "
                                     ". _ @ + -, at most 64)")
        return owner

    def json_body(self) -> dict:
        if len(self.request.body) > self.gw.max_body:
            raise web.HTTPError(413, f"the request body has {len(self.request.body)} bytes; "
                                     f"this gateway takes at most {self.gw.max_body}")
        try:
            body = json.loads(self.request.body or b"null")
        except ValueError:
            raise web.HTTPError(400, "the request body is not JSON") from None
        if not isinstance(body, dict):
            raise web.HTTPError(400, "the request body must be a JSON object")
        return body


def _esc(text) -> str:
    """Text for an HTTPError message (tornado %-formats it)."""
    return str(text).replace("%", "%%")


def _error_type(code: int) -> str:
    return {400: "invalid_request_error", 401: "authentication_error",
            403: "permission_error", 404: "not_found_error", 413: "invalid_request_error",
            429: "rate_limit_error"}.get(code, "api_error")


class ModelsHandler(BaseHandler):
    """GET v1/models: the published models this caller may use."""

    async def get(self) -> None:
        user = self.current_user
        groups = await self.gw.groups_of(user)
        data = [{"id": p.id, "object": "model", "created": int(p.created), "owned_by": p.owner,
                 "aifab": {"groups": p.groups, "labels": p.labels}}
                for p in self.gw.registry.models.values() if self.gw.may_use(user, groups, p)]
        self.finish({"object": "list", "data": data})


class CompletionsHandler(BaseHandler):
    """POST v1/chat/completions, v1/completions, v1/embeddings to the model's router, with
    the publication's key instead of the caller's credentials; streamed as it comes."""

    _upstream: OneRequestClient | None = None
    _client_left = False

    async def post(self, route: str) -> None:
        gw = self.gw
        body = self.json_body()
        try:
            model_id = "/".join(parse_model_id(body.get("model")))
        except ValueError as exc:
            raise web.HTTPError(400, _esc(exc)) from None
        pub = gw.registry.get(model_id)
        if pub is None:
            raise web.HTTPError(404, f"no published model {model_id!r}: GET v1/models lists "
                                     "the models you may use")
        user = self.current_user
        groups = await gw.groups_of(user)
        if not gw.may_use(user, groups, pub):
            raise web.HTTPError(403, f"{_esc(user['name'])} may not use {model_id}: its owner "
                                     "shares it with some hub groups, through a hub role")
        router = gw.routers.get(model_id)
        if router is None or not router.running():
            raise web.HTTPError(503, f"{model_id} has no router running: the gateway is "
                                     "starting it, try again")
        stream = bool(body.get("stream"))
        if not isinstance(body.get("stream_options") or {}, dict):
            raise web.HTTPError(400, "stream_options: an object, e.g. {\"include_usage\": true}")
        asked_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        body["model"] = pub.served_name
        if stream and not asked_usage:  # the usage log needs the counts of the last chunk
            body["stream_options"] = {**(body.get("stream_options") or {}),
                                      "include_usage": True}
        try:
            gw.limiter.acquire(user["name"], groups)
        except LimitError as exc:
            self._retry_after = exc.retry_after
            raise web.HTTPError(429, _esc(exc)) from None
        started = time.monotonic()
        counts = {"prompt_tokens": 0, "completion_tokens": 0}
        status = None
        try:
            await self._forward(router.url, "/v1/" + route, pub, body, stream, asked_usage,
                                counts)
        except web.HTTPError as exc:
            status = exc.status_code
            raise
        finally:
            tokens = counts["prompt_tokens"] + counts["completion_tokens"]
            gw.limiter.release(user["name"], tokens)
            gw.usage.record(caller=user["name"], model=model_id, stream=stream,
                            status=499 if self._client_left else status or self.get_status(),
                            latency_ms=(time.monotonic() - started) * 1000, **counts)

    async def _forward(self, router: str, route: str, pub: Publication, body: dict,
                       stream: bool, asked_usage: bool, counts: dict) -> None:
        if self._client_left:
            return
        served = json.dumps(pub.served_name).encode()
        public = json.dumps(pub.id).encode()
        pending = bytearray()
        whole = bytearray()
        status = {"code": 502, "started": False}

        def on_header(line: str) -> None:
            line = line.rstrip("\r\n")
            if line.startswith("HTTP/"):
                status["code"] = int(line.split(" ", 2)[1])
                self.set_status(status["code"])
            elif line.lower().startswith("content-type:"):
                self.set_header("Content-Type", line.split(":", 1)[1].strip())

        def on_chunk(chunk: bytes) -> None:
            if self._client_left:
                return
            if not stream or status["code"] != 200:
                whole.extend(chunk)
                return
            pending.extend(chunk)
            # whole server-sent events only: each is read for the usage counts
            while b"\n\n" in pending:
                end = pending.index(b"\n\n") + 2
                event = bytes(pending[:end])
                del pending[:end]
                if self._usage_event(event, counts) and not asked_usage:
                    continue  # the chunk the gateway asked for, not the caller
                status["started"] = True
                self.write(event.replace(b'"model":' + served, b'"model":' + public))
                self.flush()

        self._upstream = OneRequestClient(force_instance=True)
        request = httpclient.HTTPRequest(
            router + route, method="POST", body=json.dumps(body),
            # never the caller's credentials: a signature of this route with the key
            headers={"Content-Type": "application/json", "Accept": "*/*",
                     "Authorization": signing.sign(pub.key, route)},
            header_callback=on_header, streaming_callback=on_chunk, follow_redirects=False,
            connect_timeout=10, request_timeout=3600)
        try:
            await self._upstream.fetch(request, raise_error=False)
        except (OSError, httpclient.HTTPClientError) as exc:
            if self._client_left:
                return
            if not whole and not status["started"]:
                raise web.HTTPError(502, f"{pub.id}'s router did not answer: "
                                         f"{_esc(exc)}") from None
        finally:
            self._upstream.close()
            self._upstream = None
        if self._client_left:
            return
        if pending:
            self.write(bytes(pending))
        if whole:
            if status["code"] == 200:
                try:
                    counts.update({k: int(v or 0) for k, v in
                                   (json.loads(whole).get("usage") or {}).items()
                                   if k in counts})
                except (ValueError, AttributeError, TypeError):
                    pass
            self.write(bytes(whole).replace(b'"model":' + served, b'"model":' + public))
        self.finish()

    @staticmethod
    def _usage_event(event: bytes, counts: dict) -> bool:
        """Whether this event is the usage-only chunk (counted into ``counts``)."""
        if b'"usage":{' not in event and b'"usage": {' not in event:
            return False
        try:
            data = json.loads(event.split(b"data:", 1)[1])
        except (ValueError, IndexError):
            return False
        usage = data.get("usage") if isinstance(data, dict) else None
        if not isinstance(usage, dict):
            return False
        for k in counts:
            if isinstance(usage.get(k), int):
                counts[k] = usage[k]
        return not data.get("choices")

    def on_connection_close(self) -> None:
        # the caller left: close the request to the router, which closes its own to the
        # replica, and vLLM aborts the generation
        self._client_left = True
        if self._upstream is not None:
            self._upstream.connections.close_all()
        super().on_connection_close()


class NotAllowedHandler(BaseHandler):
    """Everything else under v1/: vLLM's other routes are not offered here."""

    def _refuse(self, path: str) -> None:
        raise web.HTTPError(404, f"v1/{_esc(path)} is not offered by this gateway; it serves "
                                 "v1/models, v1/chat/completions, v1/completions and "
                                 "v1/embeddings")

    get = post = put = delete = patch = _refuse


class OutsideHandler(BaseHandler):
    """/tokenize, /metrics, /health, ... of vLLM: not offered, for anyone."""

    def _refuse(self, path: str) -> None:
        raise web.HTTPError(404, f"/{_esc(path)} is not offered by this gateway; its OpenAI API is "
                                 "under v1/, its own under api/")

    get = post = put = delete = patch = _refuse


class PublishHandler(BaseHandler):
    """api/models: GET one's own publications (with their replicas' health); POST publishes
    one of one's services (the owner's Jupyter server calls this)."""

    async def get(self) -> None:
        user = self.current_user
        mine = [p for p in self.gw.registry.models.values() if p.owner == user["name"]]
        self.finish({"models": [p.public(await self.gw.health(p)) for p in mine]})

    async def post(self) -> None:
        owner = self.publisher("publish models")
        body = self.json_body()
        unknown = set(body) - {"name", "served_name", "key", "groups", "labels", "server_name"}
        if unknown:
            raise web.HTTPError(400, f"unknown fields {sorted(unknown)}; allowed: name, "
                                     "served_name, key, groups, labels, server_name")
        name, served, key = body.get("name"), body.get("served_name"), body.get("key")
        if not isinstance(name, str) or not SERVICE_NAME.fullmatch(name):
            raise web.HTTPError(400, f"name {_esc(str(name)[:80])!r}: {SERVICE_NAME_RULE}")
        if not isinstance(served, str) or not re.fullmatch(SERVED_NAME_RULE, served):
            raise web.HTTPError(400, "served_name: the model name vLLM answers to")
        if not isinstance(key, str) or not re.fullmatch(rf"[A-Za-z0-9_-]{{{KEY_MIN},128}}", key):
            raise web.HTTPError(400, f"key: {KEY_MIN} to 128 URL-safe characters")
        server = body.get("server_name", "")
        if not isinstance(server, str) or (server and not SERVICE_NAME.fullmatch(server)):
            raise web.HTTPError(400, f"server_name {_esc(str(server)[:80])!r}: '' or a server "
                                     "name")
        labels = body.get("labels") or {}
        if not isinstance(labels, dict) or not all(
                isinstance(k, str) and LABEL_KEY.fullmatch(k)
                and isinstance(v, str) and len(v) <= 200 for k, v in labels.items()):
            raise web.HTTPError(400, "labels: an object of short lowercase names to strings")
        try:
            groups = check_groups(body.get("groups"))
        except ValueError as exc:
            raise web.HTTPError(400, _esc(exc)) from None
        existing = self.gw.registry.get(f"{owner}/{name}")
        if (existing is not None and existing.deployment) or \
                f"{owner}/{name}" in self.gw._reserved:
            raise web.HTTPError(409, f"{owner}/{name} is a deployment: undeploy it first, or "
                                     "serve this model under another name")
        pub = Publication(owner=owner, name=name, served_name=served, key=key, groups=groups,
                          labels=labels, upstreams=[self.gw.replica_url(owner, server, name)])
        try:
            await self.gw.publish(pub)
        except RuntimeError as exc:
            raise web.HTTPError(503, _esc(exc)) from None
        self.set_status(201)
        self.finish(pub.public())


class PublicationHandler(BaseHandler):
    """api/models/OWNER/NAME: GET its state; DELETE withdraws it (its owner only)."""

    def _mine(self, owner: str, name: str) -> Publication:
        user = self.current_user
        pub = self.gw.registry.get(f"{owner}/{name}")
        if pub is None:
            raise web.HTTPError(404, f"no published model {owner}/{name}")
        if user["name"] != owner:
            raise web.HTTPError(403, f"only {owner} withdraws or inspects {owner}/{name}")
        self.publisher(f"manage {owner}/{name}")
        return pub

    async def get(self, owner: str, name: str) -> None:
        pub = self._mine(owner, name)
        self.finish(pub.public(await self.gw.health(pub)))

    async def delete(self, owner: str, name: str) -> None:
        pub = self._mine(owner, name)
        await self.gw.withdraw(pub.id)
        self.set_status(204)
        self.finish()


class UsageHandler(BaseHandler):
    """api/usage[?model=OWNER/NAME]: the usage log of the caller's own models."""

    async def get(self) -> None:
        user = self.current_user
        mine = {p.id for p in self.gw.registry.models.values() if p.owner == user["name"]}
        wanted = self.get_argument("model", "")
        if wanted:
            if wanted not in mine:
                raise web.HTTPError(403, f"{_esc(user['name'])} reads the usage of their own "
                                         f"models only, not {_esc(wanted[:80])!r}")
            mine = {wanted}
        self.finish({"usage": self.gw.usage.lines_for(mine)})


class DeploymentsHandler(BaseHandler):
    """api/deployments: GET one's own deployments; POST deploys (replicas as Slurm jobs the
    gateway keeps until ``until``, outliving the session)."""

    def _owner(self) -> str:
        owner = self.publisher("deploy models")
        if self.gw.deployer is None:
            raise web.HTTPError(409, "this hub runs no deployments (add_models_service has "
                                     "no deploy=...): publish a session's model instead")
        return owner

    async def get(self) -> None:
        owner = self._owner()
        mine = [p for p in self.gw.registry.models.values()
                if p.owner == owner and p.deployment]
        self.finish({"deployments": [p.public(await self.gw.health(p)) for p in mine]})

    async def post(self) -> None:
        from aifab import slurm

        from .deployments import DeployError, check_request

        owner = self._owner()
        body = self.json_body()
        allowed = {"name", "model", "replicas", "until", "groups", "gpus", "max_model_len",
                   "served_name"}
        if set(body) - allowed:
            raise web.HTTPError(400, f"unknown fields {sorted(set(body) - allowed)}; allowed: "
                                     f"{', '.join(sorted(allowed))}")
        name = body.get("name")
        if not isinstance(name, str) or not SERVICE_NAME.fullmatch(name):
            raise web.HTTPError(400, f"name {_esc(str(name)[:80])!r}: {SERVICE_NAME_RULE}")
        served = body.get("served_name") or name
        if not isinstance(served, str) or not re.fullmatch(SERVED_NAME_RULE, served):
            raise web.HTTPError(400, "served_name: the model name vLLM answers to")
        if self.gw.taken(f"{owner}/{name}"):
            raise web.HTTPError(409, f"{owner}/{name} is published already: undeploy or "
                                     "withdraw it first, or choose another name")
        try:
            groups = check_groups(body.get("groups"))
            request = check_request(body, self.gw.deployer.settings, time.time())
        except (ValueError, DeployError) as exc:
            raise web.HTTPError(400, _esc(exc)) from None
        try:
            pub = await self.gw.deploy(owner, name, served, groups, request)
        except DeployError as exc:
            raise web.HTTPError(400, _esc(exc)) from None
        except ValueError as exc:  # (the same name, deployed meanwhile)
            raise web.HTTPError(409, _esc(exc)) from None
        except (slurm.SlurmError, RuntimeError) as exc:
            raise web.HTTPError(503, f"could not start the replicas: {_esc(exc)}") from None
        self.set_status(201)
        self.finish(pub.public())


class DeploymentHandler(PublicationHandler):
    """api/deployments/OWNER/NAME: GET its replicas (job, state, node, health); DELETE
    undeploys (cancels every replica job); ``/logs?job=ID&n=100``: a replica's logs."""

    def _mine(self, owner: str, name: str) -> Publication:
        pub = super()._mine(owner, name)
        if not pub.deployment:
            raise web.HTTPError(404, f"{owner}/{name} is a session's model, not a deployment")
        return pub

    async def get(self, owner: str, name: str, logs: str = "") -> None:
        pub = self._mine(owner, name)
        if not logs:
            self.finish(pub.public(await self.gw.health(pub)))
            return
        job = self.get_argument("job", "")
        n = self.get_argument("n", "100")
        if job not in pub.jobs and not re.fullmatch(r"[0-9]{1,12}", job):
            raise web.HTTPError(400, "job: the id of one of its replica jobs")
        if not re.fullmatch(r"[0-9]{1,5}", n) or int(n) < 1:
            raise web.HTTPError(400, "n: the number of lines, 1 to 99999")
        if self.gw.deployer is None:
            raise web.HTTPError(409, "this hub runs no deployments any more")
        self.finish({"job": job, **self.gw.deployer.logs(pub, job, int(n))})

    async def delete(self, owner: str, name: str, logs: str = "") -> None:
        if logs:
            raise web.HTTPError(405)
        pub = self._mine(owner, name)
        await self.gw.withdraw(pub.id)
        self.set_status(204)
        self.finish()


def handlers(prefix: str) -> list:
    from jupyterhub.services.auth import HubOAuthCallbackHandler

    owner = r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}"
    name = r"[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?"
    return [
        (prefix + "oauth_callback", HubOAuthCallbackHandler),
        (prefix + "v1/models", ModelsHandler),
        (prefix + r"v1/(chat/completions|completions|embeddings)", CompletionsHandler),
        (prefix + r"v1/(.*)", NotAllowedHandler),
        (prefix + "api/models", PublishHandler),
        (prefix + rf"api/models/({owner})/({name})", PublicationHandler),
        (prefix + "api/usage", UsageHandler),
        (prefix + "api/deployments", DeploymentsHandler),
        (prefix + rf"api/deployments/({owner})/({name})(/logs)?", DeploymentHandler),
        (prefix + r"(.*)", OutsideHandler),
    ]

