"""Shared pieces of the serving benchmarks: a Jupyter server with the extension, the tiny
model, and a bare vLLM server started with the same arguments the session services use."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from aifab.extension.kinds.vllm import vllm_argv, vllm_env
from aifab.magics.tiny_model import build_cached
from tests.harness.jupyter import JupyterServer

REPO = Path(__file__).resolve().parent.parent


def tiny_model() -> Path:
    return build_cached(Path(os.environ.get("AIFAB_TEST_CACHE", REPO / ".cache")) / "tiny-model")


def jupyter_server() -> JupyterServer:
    server = JupyterServer(Path(tempfile.mkdtemp(prefix="aifab-bench-")))
    server.start()
    return server


def uds_client(socket_path: str, key: str) -> httpx.Client:
    """An HTTP client straight to a vLLM socket, with its key."""
    return httpx.Client(transport=httpx.HTTPTransport(uds=socket_path),
                        base_url="http://localhost", timeout=120,
                        headers={"Authorization": f"Bearer {key}"})


def ready(client: httpx.Client, name: str) -> bool:
    """The same definition of ready as the session services: health, model, one request."""
    try:
        if client.get("/health", timeout=5).status_code != 200:
            return False
        models = client.get("/v1/models", timeout=10).json()["data"]
        if name not in [m["id"] for m in models]:
            return False
        r = client.post("/v1/completions", timeout=60,
                        json={"model": name, "prompt": "Hello", "max_tokens": 1})
        return r.status_code == 200
    except (httpx.HTTPError, ValueError, KeyError):
        return False


class BareVLLM:
    """vLLM started by hand, with the arguments the session services would give it."""

    def __init__(self, model: Path, name: str = "bare"):
        self.key, self.name = secrets.token_urlsafe(24), name
        self.dir = Path(tempfile.mkdtemp(prefix="aifab-bare-"))
        for sub in ("cache", "tmp"):
            (self.dir / sub).mkdir()
        self.socket = str(self.dir / "vllm.sock")
        self.argv = vllm_argv(sys.executable, str(model), socket_path=self.socket,
                              served_name=name, tensor_parallel=1, cpu=True)
        self.env = vllm_env(os.environ, [], str(self.dir), cpu=True, api_key=self.key)
        self.client = uds_client(self.socket, self.key)
        self.proc: subprocess.Popen | None = None

    def start_and_wait(self, timeout: float = 600) -> float:
        t0 = time.perf_counter()
        log = open(self.dir / "log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        while not (os.path.exists(self.socket) and ready(self.client, self.name)):
            if self.proc.poll() is not None or time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"bare vLLM did not start; see {self.dir / 'log'}")
            time.sleep(0.5)
        return time.perf_counter() - t0

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
