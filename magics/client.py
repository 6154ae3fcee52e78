"""A small client of the session services, for kernels and scripts.

It finds its Jupyter server by, in order: ``AIFAB_SERVER_URL``/``AIFAB_SERVER_TOKEN``; the
variables JupyterHub gives a single-user server (and so its kernels); the running server
that started this kernel (Jupyter's runtime files).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import requests

from aifab.api import ENDED, Status
from aifab.session import ENV_PUBLIC_URL, ENV_SERVER_TOKEN, ENV_SERVER_URL


def kernel_path(path: str) -> str:
    """A path that exists relative to the kernel's folder, made absolute: the server resolves
    relative paths against its own folder. Anything else (a model name) stays as it is."""
    expanded = os.path.expanduser(path)
    return os.path.abspath(expanded) if os.path.exists(expanded) else path


class ServiceRequestError(RuntimeError):
    """The session services refused a request; the message is theirs."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class ServerInfo:
    url: str  # http://127.0.0.1:PORT/BASE/
    token: str
    public_url: str = ""  # what a browser uses (through the hub's proxy), if known


def find_server() -> ServerInfo:
    env = os.environ
    if env.get(ENV_SERVER_URL):
        return ServerInfo(env[ENV_SERVER_URL].rstrip("/") + "/",
                          env.get(ENV_SERVER_TOKEN, ""), env.get(ENV_PUBLIC_URL, ""))
    if env.get("JUPYTERHUB_SERVICE_URL") and env.get("JUPYTERHUB_API_TOKEN"):
        url = env["JUPYTERHUB_SERVICE_URL"].replace("://0.0.0.0:", "://127.0.0.1:")
        public = env.get("JUPYTERHUB_PUBLIC_URL") or ""
        return ServerInfo(url.rstrip("/") + "/", env["JUPYTERHUB_API_TOKEN"], public)
    from jupyter_server.serverapp import list_running_servers

    parent = os.getppid()
    for info in list_running_servers():
        if info.get("pid") == parent:
            url = info["url"].replace("://localhost:", "://127.0.0.1:")
            return ServerInfo(url.rstrip("/") + "/", info.get("token", ""))
    raise ServiceRequestError(0, "cannot find this session's Jupyter server: run this in a "
                                 "notebook of the aifab kernel, or set AIFAB_SERVER_URL and "
                                 "AIFAB_SERVER_TOKEN")


class SessionClient:
    def __init__(self, server: ServerInfo | None = None):
        self.server = server or find_server()
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"token {self.server.token}"

    def request(self, method: str, path: str, **kw):
        r = self.http.request(method, self.server.url + path.lstrip("/"),
                              timeout=kw.pop("timeout", 60), **kw)
        if r.status_code >= 400:
            try:
                message = r.json().get("message") or r.text
            except ValueError:
                message = r.text
            raise ServiceRequestError(r.status_code, message)
        return r.json() if r.content else None  # (204: no body)

    def session(self) -> dict:
        return self.request("GET", "aifab/api/session")

    def services(self) -> list[dict]:
        return self.request("GET", "aifab/api/services")

    def create(self, spec: dict) -> dict:
        return self.request("POST", "aifab/api/services", json=spec)

    def get(self, name: str) -> dict:
        return self.request("GET", f"aifab/api/services/{name}")

    def stop(self, name: str) -> dict:
        return self.request("DELETE", f"aifab/api/services/{name}", timeout=120)

    def logs(self, name: str, n: int = 100) -> list[str]:
        return self.request("GET", f"aifab/api/services/{name}/logs",
                            params={"n": str(n)})["lines"]

    def proxy_url(self, name: str) -> str:
        return f"{self.server.url}aifab/proxy/{name}/"

    def wait(self, name: str, timeout: float, until=(Status.READY,)) -> dict:
        """Poll until the service is in one of ``until`` (or failed/stopped); raise on
        failure with its last log lines, or TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            svc = self.get(name)
            if svc["status"] in until:
                return svc
            if svc["status"] in ENDED:
                lines = "\n".join(self.logs(name, 20))
                raise ServiceRequestError(0, f"service {name!r} {svc['status']}: "
                                             f"{svc['error']}\n--- last log lines ---\n{lines}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"service {name!r} not {until[0]} after {timeout:.0f}s "
                                   f"(phase: {svc['phase']})")
            time.sleep(0.5)


class ServiceHandle:
    """What every handle on a session service has: its name, live info, logs and stop."""

    def __init__(self, name: str, client: SessionClient | None = None):
        self.name = name
        self._client = client or SessionClient()
        self.widget = None  # the cell's display, when a magic started it

    @property
    def info(self) -> dict:
        return self._client.get(self.name)

    @property
    def status(self) -> str:
        return self.info["status"]

    @property
    def gpus(self) -> list[str]:
        return self.info["gpus"]

    def stop(self) -> dict:
        return self._client.stop(self.name)

    def logs(self, n: int = 50) -> list[str]:
        return self._client.logs(self.name, n)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self.status}>"
