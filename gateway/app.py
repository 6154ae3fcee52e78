"""The ``aifab-models`` hub service: the gateway process (``python -m aifab.gateway``).

JupyterHub starts it (a managed service: ``aifab.gateway.add_models_service`` writes the hub
config) and restarts it with the hub; it finds its registry again in its state folder and
starts a router for every publication. Settings come from the environment the hub config
gives it (``AIFAB_MODELS_*``, listed in ``Settings``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlparse

from jupyterhub.services.auth import HubOAuth
from jupyterhub.utils import url_path_join
from tornado import httpclient, web
from tornado.httpserver import HTTPServer

from .deployments import Deployer, DeploySettings
from .handlers import handlers
from .hub_config import SCOPE_PUBLISH, SCOPE_USE
from .limits import Limiter, parse_limits
from .registry import Publication, Registry
from .routers import Router
from .usage import UsageLog

log = logging.getLogger("aifab.gateway")


@dataclass
class Settings:
    state_dir: Path  # AIFAB_MODELS_STATE: registry.json, usage.jsonl, router logs
    proxy_url: str  # AIFAB_MODELS_PROXY_URL: where the hub's proxy answers, from here
    auth_cache_seconds: int = 60  # AIFAB_MODELS_AUTH_CACHE: token and group lookups
    max_body: int = 256 * 1024  # AIFAB_MODELS_MAX_BODY: bytes of one request
    limits: str = "{}"  # AIFAB_MODELS_LIMITS: JSON, see aifab.gateway.limits
    health_interval: int = 2  # AIFAB_MODELS_HEALTH_INTERVAL: the routers' health checks
    deploy: str = ""  # AIFAB_MODELS_DEPLOY: JSON, see aifab.gateway.deployments

    @classmethod
    def from_env(cls, env=os.environ) -> Settings:
        public = env.get("JUPYTERHUB_PUBLIC_HUB_URL", "")
        origin = (f"{urlparse(public).scheme}://{urlparse(public).netloc}" if public
                  else "http://127.0.0.1:8000")
        if "AIFAB_MODELS_STATE" not in env:
            raise SystemExit("aifab-models: AIFAB_MODELS_STATE (the state folder) is not set")
        return cls(state_dir=Path(env["AIFAB_MODELS_STATE"]),
                   proxy_url=env.get("AIFAB_MODELS_PROXY_URL", origin).rstrip("/"),
                   auth_cache_seconds=int(env.get("AIFAB_MODELS_AUTH_CACHE", "60")),
                   max_body=int(env.get("AIFAB_MODELS_MAX_BODY", str(256 * 1024))),
                   limits=env.get("AIFAB_MODELS_LIMITS", "{}"),
                   health_interval=int(env.get("AIFAB_MODELS_HEALTH_INTERVAL", "2")),
                   deploy=env.get("AIFAB_MODELS_DEPLOY", ""))


class Gateway:
    """The gateway's state: registry, routers, limits, usage log, and the hub lookups."""

    def __init__(self, settings: Settings, hub_auth: HubOAuth, hub_base_url: str = "/"):
        self.settings = settings
        settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.registry = Registry(settings.state_dir)
        self.usage = UsageLog(settings.state_dir)
        self.limiter = Limiter(*parse_limits(json.loads(settings.limits)))
        self.max_body = settings.max_body
        self.hub_auth = hub_auth
        self.hub_base_url = hub_base_url
        self.routers: dict[str, Router] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._watch: asyncio.Future | None = None
        self._groups: dict[str, tuple[float, list[str]]] = {}
        self._http = httpclient.AsyncHTTPClient()
        deploy = DeploySettings.from_json(settings.deploy)
        # (None: this site runs no deployments; their API says so)
        self.deployer = Deployer(deploy, self.registry, sys.executable) if deploy else None
        for pub in self.registry.models.values():  # (a failing streak starts anew)
            for info in pub.jobs.values():
                info["unhealthy_since"] = None
        self._deploy_locks: dict[str, asyncio.Lock] = {}
        self._reserved: set[str] = set()  # ids a deploy request is submitting for

    # --- who may use what

    async def groups_of(self, user: dict) -> list[str]:
        """The hub groups of a calling user, asked of the hub with the gateway's own token
        (``read:users:groups``), kept as long as the hub's answers on tokens are."""
        if user.get("kind") != "user":
            return []
        name = user["name"]
        now = asyncio.get_running_loop().time()
        hit = self._groups.get(name)
        if hit and hit[0] > now:
            return hit[1]
        r = await self._http.fetch(
            url_path_join(self.hub_auth.api_url, "users", quote(name, safe="")),
            headers={"Authorization": f"token {self.hub_auth.api_token}"}, request_timeout=10)
        groups = json.loads(r.body).get("groups", [])
        self._groups[name] = (now + self.settings.auth_cache_seconds, groups)
        return groups

    def may_use(self, user: dict, groups: list[str], pub: Publication) -> bool:
        """The owner, or a caller whom a hub role lets use the owner's models and whom the
        owner shared this one with (one of its groups)."""
        check = self.hub_auth.check_scopes
        if user.get("kind") == "user" and user["name"] == pub.owner:
            return bool(check(f"{SCOPE_PUBLISH}!user={pub.owner}", user)
                        or check(f"{SCOPE_USE}!user={pub.owner}", user))
        return bool(check(f"{SCOPE_USE}!user={pub.owner}", user)
                    and set(groups) & set(pub.groups))

    # --- publications

    def replica_url(self, owner: str, server: str, name: str) -> str:
        """The published route of ``name`` on the owner's server, through the hub's proxy."""
        path = url_path_join(self.hub_base_url, "user", quote(owner, safe=""),
                             quote(server, safe=""), "aifab", "published", name)
        return self.settings.proxy_url + path

    async def publish(self, pub: Publication) -> None:
        """Route it, then record it: a router that does not start leaves nothing behind."""
        await self._route(pub)
        self.registry.put(pub)

    def taken(self, model_id: str) -> bool:
        return model_id in self.registry.models or model_id in self._reserved

    async def deploy(self, owner: str, name: str, served_name: str, groups: list[str],
                     request: dict) -> Publication:
        """Submit the replicas, then route and record it (the watch adds the replicas to
        the router as they start). The id is reserved while it submits."""
        model_id = f"{owner}/{name}"
        if self.taken(model_id):
            raise ValueError(f"{model_id} is published already")
        self._reserved.add(model_id)
        try:
            pub = await self.deployer.create(owner, name, served_name, groups, request)
            try:
                await self._route(pub)
            except RuntimeError:
                await self.deployer.cancel(pub, list(pub.jobs))
                raise
            self.registry.put(pub)
        finally:
            self._reserved.discard(model_id)
        return pub

    async def withdraw(self, model_id: str) -> None:
        async with self._deploy_locks.setdefault(model_id, asyncio.Lock()):
            pub = self.registry.get(model_id)
            self.registry.remove(model_id)  # (first: a look at it now submits nothing)
            if pub is not None and pub.deployment:
                if self.deployer is None:
                    log.error("aifab-models: %s is a deployment but this gateway has no "
                              "deploy settings: cancel its jobs %s by hand", model_id,
                              ",".join(pub.jobs))
                else:
                    try:
                        await self.deployer.cancel(pub, list(pub.jobs))
                    except Exception as exc:
                        log.error("aifab-models: cancelling %s's jobs %s failed: %s",
                                  model_id, ",".join(pub.jobs), exc)
        router = self.routers.pop(model_id, None)
        if router is not None:
            await router.stop()

    async def _route(self, pub: Publication) -> None:
        # one router per model, even when a publish and the watch come at once
        async with self._locks.setdefault(pub.id, asyncio.Lock()):
            router = self.routers.get(pub.id)
            if router is None or not router.running():
                router = Router(pub.id, self.settings.state_dir, self.settings.health_interval)
                await router.start()
                self.routers[pub.id] = router
                self._save_pids()
            router.set_workers(pub.upstreams)

    def _save_pids(self) -> None:
        """The routers' processes, for a gateway that starts after this one was killed."""
        (self.settings.state_dir / "routers.json").write_text(json.dumps(
            [[r.proc.pid, r.started] for r in self.routers.values() if r.proc]))

    async def _stop_leftover_routers(self) -> None:
        """Routers a killed gateway left (they run in sessions of their own)."""
        try:
            pids = json.loads((self.settings.state_dir / "routers.json").read_text())
        except (OSError, ValueError):
            return
        from aifab import supervisor

        for pid, started in pids:
            if supervisor.is_same(pid, started):
                await supervisor.stop_tree(pid, started, grace=5)

    async def health(self, pub: Publication) -> dict[str, bool]:
        router = self.routers.get(pub.id)
        return await router.health() if router else {}

    async def start(self) -> None:
        """Routers for what the registry holds (a restarted gateway), then a watch that
        restarts a router that died."""
        await self._stop_leftover_routers()
        for pub in list(self.registry.models.values()):
            try:
                await self._route(pub)
            except RuntimeError as exc:
                log.error("aifab-models: %s", exc)
        self._watch = asyncio.ensure_future(self._keep_routers())

    async def _keep_routers(self) -> None:
        """Every few seconds: a router that died starts again, a replica that was not yet
        healthy when it was published is offered again, a worker nobody published goes."""
        while True:
            await asyncio.sleep(self.settings.health_interval)
            for pub in list(self.registry.models.values()):
                router = self.routers.get(pub.id)
                try:
                    if router is None or not router.running():
                        log.warning("aifab-models: the router of %s is not running; starting "
                                    "it", pub.id)
                        await self._route(pub)
                    else:
                        if pub.deployment and self.deployer is not None:
                            async with self._deploy_locks.setdefault(pub.id, asyncio.Lock()):
                                ended = await self.deployer.tick(
                                    pub, router.probe,
                                    lambda p=pub: self.registry.get(p.id) is p)
                            if ended:
                                log.info("aifab-models: %s reached its end; undeploying",
                                         pub.id)
                                await self.withdraw(pub.id)
                                continue
                            if self.registry.get(pub.id) is not pub:
                                continue
                        router.set_workers(pub.upstreams)
                        await router.sweep(pub.upstreams)
                except Exception as exc:  # the watch goes on whatever one model does
                    log.error("aifab-models: %s: %s", pub.id, exc)

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        await asyncio.gather(*(r.stop() for r in self.routers.values()))
        self.usage.close()


def make_app(gateway: Gateway, prefix: str, hub_auth: HubOAuth) -> web.Application:
    return web.Application(handlers(prefix), aifab_gateway=gateway, hub_auth=hub_auth,
                           cookie_secret=os.urandom(32))


async def serve() -> None:
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s %(asctime)s "
                                                   "aifab-models] %(message)s")
    settings = Settings.from_env()
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/aifab-models/")
    # (no ?token= in URLs: it would end up in access logs)
    # (the instance: the OAuth callback handler asks HubOAuth.instance() for it)
    hub_auth = HubOAuth.instance(cache_max_age=settings.auth_cache_seconds,
                                allow_token_in_url=False)
    gateway = Gateway(settings, hub_auth, os.environ.get("JUPYTERHUB_BASE_URL", "/"))
    url = urlparse(os.environ.get("JUPYTERHUB_SERVICE_URL", "http://127.0.0.1:8182"))
    server = HTTPServer(make_app(gateway, prefix, hub_auth), xheaders=True,
                        max_body_size=4 * settings.max_body + 65536)
    server.listen(url.port or 80, url.hostname or "127.0.0.1")
    await gateway.start()
    log.info("aifab-models: serving %s at %s (%d published models)", prefix, url.geturl(),
             len(gateway.registry.models))
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    server.stop()
    await gateway.stop()


def main() -> None:
    asyncio.run(serve())
