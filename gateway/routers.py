"""One vLLM router (PyPI ``vllm-router``) per published model, started and watched by the
gateway: it spreads requests over the model's replicas, checks their /health, takes a failing
one out of rotation (health threshold, circuit breaker) and retries on another.

The router listens on loopback only and checks no credential itself: the gateway in front of
it authenticates, and the replicas' routes demand the publication's key, which only the
gateway adds (the router passes a request's ``Authorization`` through). It is started with
no ``--api-key`` on purpose: with one it would add the key to its own pass-through routes
(/tokenize, /metrics), which the replicas' routes refuse anyway.

Workers are added through the router's ``/add_worker`` once they answer /health (the router
holds an ``add_worker`` call open until then, so the gateway adds in the background).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import sys
from pathlib import Path
from urllib.parse import quote

from tornado import httpclient

from aifab import supervisor

log = logging.getLogger("aifab.gateway")

ROUTER_BIN = "vllm-router"


def router_command() -> str:
    """The router next to this Python (the venv's), else on PATH."""
    here = Path(sys.executable).parent / ROUTER_BIN
    found = str(here) if here.exists() else shutil.which(ROUTER_BIN)
    if not found:
        raise RuntimeError("vllm-router is not installed: pip install 'jupyter-aifab[gateway]' "
                           "(the PyPI package vllm-router)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def router_argv(port: int, metrics_port: int, health_interval: int) -> list[str]:
    return [router_command(), "--host", "127.0.0.1", "--port", str(port),
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
            # (power_of_two refuses to start with fewer than 2 workers; replicas come and go)
            "--policy", "round_robin",
            "--health-check-interval-secs", str(health_interval),
            "--health-failure-threshold", "2", "--health-success-threshold", "1",
            "--health-check-timeout-secs", "5",
            "--retry-max-retries", "3", "--cb-failure-threshold", "3",
            "--cb-timeout-duration-secs", "10",
            "--request-timeout-secs", "3600", "--worker-startup-timeout-secs", "600",
            "--log-level", "warning"]


class Router:
    def __init__(self, model_id: str, log_dir: Path, health_interval: int = 2):
        self.model_id = model_id
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = router_argv(self.port, _free_port(), health_interval)
        self.log_path = Path(log_dir) / f"router-{model_id.replace('/', '--')}.log"
        self.proc = None
        self.started = 0.0
        self.workers: set[str] = set()
        self._adding: dict[str, asyncio.Task] = {}
        self._tasks: set[asyncio.Future] = set()
        self._http = httpclient.AsyncHTTPClient()

    async def start(self, timeout: float = 30) -> None:
        # (not the gateway's hub token: the router needs no credentials)
        env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTERHUB_")}
        self.proc, self.started = supervisor.launch(
            self.argv, env={**env, "RUST_LOG": "warn"}, log_path=self.log_path,
            cwd=self.log_path.parent)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm-router for {self.model_id} exited "
                                   f"{self.proc.returncode}: see {self.log_path}")
            try:
                await self._http.fetch(f"{self.url}/list_workers", request_timeout=2)
                return
            except (OSError, httpclient.HTTPClientError):
                if asyncio.get_running_loop().time() > deadline:
                    await self.stop()  # nothing half-started
                    raise RuntimeError(f"vllm-router for {self.model_id} not answering after "
                                       f"{timeout}s: see {self.log_path}") from None
                await asyncio.sleep(0.1)

    def set_workers(self, urls: list[str]) -> None:
        """Add the new replicas (in the background: the router answers only once the replica
        is healthy) and remove the ones that went."""
        for url in set(urls) - self.workers - set(self._adding):
            self._adding[url] = asyncio.ensure_future(self._add(url))
        for url in self.workers - set(urls):
            self.workers.discard(url)
            self._tasks.add(asyncio.ensure_future(self._call("remove_worker", url)))

    async def sweep(self, urls: list[str]) -> None:
        """Take out any worker the router lists that is not one of ``urls``: the router's
        admin routes have no authentication, so another process on this host could add one
        (it would get callers' requests, with a signature good for a minute; never a key)."""
        try:
            r = await self._http.fetch(f"{self.url}/list_workers", request_timeout=2)
            listed = set(json.loads(r.body).get("urls", []))
        except (OSError, ValueError, httpclient.HTTPClientError):
            return
        for url in listed - set(urls):
            log.warning("aifab-models: the router of %s had a worker nobody published (%s); "
                        "removed it", self.model_id, url)
            await self._call("remove_worker", url)

    async def _add(self, url: str) -> None:
        try:
            await self._call("add_worker", url, timeout=660)
            self.workers.add(url)
        except Exception as exc:  # the replica never became healthy: the listing says so
            log.warning("aifab-models: router of %s could not add a replica: %s",
                        self.model_id, exc)
        finally:
            self._adding.pop(url, None)

    async def _call(self, what: str, url: str, timeout: float = 30) -> None:
        await self._http.fetch(f"{self.url}/{what}?url={quote(url, safe='')}", method="POST",
                               body=b"", request_timeout=timeout)

    async def health(self) -> dict[str, bool]:
        """Which replicas the router has in rotation (it drops one whose /health fails)."""
        try:
            r = await self._http.fetch(f"{self.url}/list_workers", request_timeout=2)
        except (OSError, httpclient.HTTPClientError):
            return {}
        listed = set(json.loads(r.body).get("urls", []))
        healthy = await asyncio.gather(*(self.probe(u) for u in listed))
        return dict(zip(listed, healthy, strict=True))

    async def probe(self, url: str) -> bool:
        """Whether a replica answers its /health, asked of the replica itself."""
        try:
            r = await self._http.fetch(f"{url}/health", request_timeout=3, raise_error=False)
            return r.code == 200
        except OSError:
            return False

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def stop(self) -> None:
        for task in [*self._adding.values(), *self._tasks]:
            task.cancel()
        if self.proc is not None:
            await supervisor.stop_tree(self.proc.pid, self.started, grace=5,
                                       reap=self.proc.poll)
