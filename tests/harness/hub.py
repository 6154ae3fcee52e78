"""A real JupyterHub (with configurable-http-proxy) for tests and benchmarks.

The hub runs as a subprocess from this environment's ``jupyterhub`` with a config that first
loads the config under test (the demo's or an example's, as they are) and then pins what a
test needs: loopback ports, a private database and an API token for the test's client.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests

BIN = Path(sys.executable).parent


def stop_process(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, wait, then SIGKILL the process's whole group (it was started in its own)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HubError(RuntimeError):
    pass


class Hub:
    """One JupyterHub process. ``extra_config`` is Python appended to the generated config."""

    def __init__(self, root: Path, config_file: Path | None = None, extra_config: str = "",
                 env: dict | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_file = config_file
        self.extra_config = extra_config
        self.port = free_port()
        self.hub_port = free_port()
        self.proxy_api_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = secrets.token_hex(16)
        # the demo config's models gateway listens here (a port of its own per hub)
        self.env = {"AIFAB_DEMO_MODELS_PORT": str(free_port()), **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log_path = self.root / "hub.log"

    # ---------------------------------------------------------------- lifecycle
    def write_config(self) -> Path:
        lines = ["c = get_config()  # noqa"]
        if self.config_file:
            lines.append(f"load_subconfig({str(self.config_file)!r})  # noqa")
        lines += [
            f"c.JupyterHub.bind_url = 'http://127.0.0.1:{self.port}'",
            # what a browser uses, as the demo sets it (servers learn it: JUPYTERHUB_PUBLIC_URL)
            f"c.JupyterHub.public_url = 'http://127.0.0.1:{self.port}/'",
            "c.JupyterHub.hub_ip = '127.0.0.1'",
            f"c.JupyterHub.hub_port = {self.hub_port}",
            f"c.ConfigurableHTTPProxy.api_url = 'http://127.0.0.1:{self.proxy_api_port}'",
            f"c.ConfigurableHTTPProxy.command = [{str(BIN / 'configurable-http-proxy')!r}]",
            f"c.ConfigurableHTTPProxy.pid_file = {str(self.root / 'proxy.pid')!r}",
            f"c.JupyterHub.db_url = 'sqlite:///{self.root / 'jupyterhub.sqlite'}'",
            f"c.JupyterHub.cookie_secret_file = {str(self.root / 'cookie_secret')!r}",
            f"c.JupyterHub.pid_file = {str(self.root / 'hub.pid')!r}",
            # added to what the config under test has (the demo's models gateway, its roles)
            "_services = c.JupyterHub.services if 'services' in c.JupyterHub else []",
            "_roles = c.JupyterHub.load_roles if 'load_roles' in c.JupyterHub else []",
            "c.JupyterHub.services = _services + [{'name': 'aifab-test', 'api_token': "
            f"{self.token!r}}}]",
            "c.JupyterHub.load_roles = _roles + [{'name': 'aifab-test', "
            "'services': ['aifab-test'], "
            "'scopes': ['admin:users', 'admin:servers', 'admin:groups', 'access:servers', "
            "'read:users', 'list:users', 'read:users:activity', 'tokens', 'read:metrics']}]",
            self.extra_config,
        ]
        path = self.root / "jupyterhub_config.py"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, timeout: float = 60) -> None:
        cfg = self.write_config()
        env = {**os.environ, **self.env,
               "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(BIN / "jupyterhub"), "-f", str(cfg)], cwd=self.root, env=env,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HubError(f"jupyterhub exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/hub/api/", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise HubError(f"jupyterhub not answering after {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30) -> None:
        if self.proc is None:
            return
        stop_process(self.proc, timeout)
        self.proc = None
        self._log.close()
        self._stop_leftover_proxy()

    def _stop_leftover_proxy(self) -> None:
        pid_file = self.root / "proxy.pid"
        try:
            pid = int(pid_file.read_text())
        except (OSError, ValueError):
            return
        try:
            cmdline = " ".join(psutil.Process(pid).cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return
        if "configurable-http-proxy" in cmdline:
            os.kill(pid, signal.SIGTERM)

    def restart(self) -> None:
        self.stop()
        self.start()

    # ---------------------------------------------------------------- REST API
    def api(self, method: str, path: str, **kw) -> requests.Response:
        headers = {"Authorization": f"token {self.token}", **kw.pop("headers", {})}
        return requests.request(method, f"{self.url}/hub/api{path}", headers=headers,
                                timeout=kw.pop("timeout", 30), **kw)

    def user_model(self, name: str) -> dict:
        r = self.api("GET", f"/users/{name}")
        r.raise_for_status()
        return r.json()

    def wait_for_server(self, name: str, timeout: float = 60, server: str = "") -> dict:
        """Wait until the user's server is ready; raise with the pending state and log tail."""
        deadline = time.monotonic() + timeout
        model = {}
        while time.monotonic() < deadline:
            model = self.user_model(name)
            srv = model.get("servers", {}).get(server)
            if srv and srv.get("ready"):
                return srv
            if not srv:
                raise HubError(f"{name}'s server is gone (failed to start?):\n{self.log_tail()}")
            time.sleep(0.1)
        raise HubError(f"{name}'s server not ready after {timeout}s: {model}\n{self.log_tail()}")

    def wait_for_stopped(self, name: str, timeout: float = 30, server: str = "") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if server not in self.user_model(name).get("servers", {}):
                return
            time.sleep(0.1)
        raise HubError(f"{name}'s server still listed after {timeout}s\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no hub log)"
        return "\n".join(lines[-n:])
