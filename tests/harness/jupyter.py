"""A real Jupyter server (with the aifab extension, as installed) for tests."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import requests

from tests.harness.hub import free_port, stop_process

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent.parent


class JupyterServer:
    def __init__(self, root: Path, env: dict | None = None, probe_kind: bool = False,
                 args: tuple[str, ...] = ()):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}/"
        self.env = {**os.environ, "AIFAB_STATE_DIR": str(self.root / "state"),
                    "JUPYTER_RUNTIME_DIR": str(self.root / "runtime"), **(env or {})}
        # tests.probe_kind: small real services (http.server, a process tree) for tests of
        # the services where vLLM adds nothing; importable from the repository root
        self.extra_args = []
        if probe_kind:
            self.env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(REPO), self.env.get("PYTHONPATH", "")) if p)
            self.extra_args = ["--AifabExtension.extra_service_kinds",
                               "probe=tests.probe_kind:ProbeKind"]
        self.extra_args += list(args)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.root / "server.log"

    def start(self, timeout: float = 60) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen(
            [str(BIN / "jupyter"), "server", "--no-browser", "--ip=127.0.0.1",
             f"--port={self.port}", f"--IdentityProvider.token={self.token}",
             f"--ServerApp.root_dir={self.root}", "--ServerApp.allow_root=True",
             "--ServerApp.port_retries=0", *self.extra_args],
            env=self.env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter server exited:\n{self.log_tail()}")
            try:
                if self.get("api/status").status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"jupyter server not up after {timeout}s:\n{self.log_tail()}")

    def __enter__(self) -> JupyterServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, timeout: float = 60) -> None:
        """Graceful shutdown (SIGTERM), as when a session ends."""
        if self.proc:
            stop_process(self.proc, timeout)
        self.proc = None

    def crash(self) -> None:
        """SIGKILL the server process alone: what survives is up to the services."""
        if self.proc:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def request(self, method: str, path: str, token: str | None = "default", **kw):
        headers = kw.pop("headers", {})
        if token == "default":
            token = self.token
        if token is not None:
            headers["Authorization"] = f"token {token}"
        return requests.request(method, self.url + path, headers=headers,
                                timeout=kw.pop("timeout", 60), **kw)

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def wait_service(self, name: str, status: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        svc = {}
        while time.monotonic() < deadline:
            svc = self.get(f"aifab/api/services/{name}").json()
            if svc.get("status") == status:
                return svc
            if svc.get("status") in ("failed", "stopped") and status == "ready":
                break
            time.sleep(0.25)
        log = self.get(f"aifab/api/services/{name}/logs", params={"n": "40"}).json()
        raise AssertionError(f"service {name} is {svc.get('status')!r}, not {status!r}: "
                             f"{svc}\n" + "\n".join(log.get("lines", [])))

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no server log)"


from aifab.supervisor import group_alive  # noqa: E402  (the one supervisor, re-exported)

__all__ = ["JupyterServer", "group_alive"]
