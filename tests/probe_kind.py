"""A service kind for tests of the session services where vLLM adds nothing: small real
processes whose command line the server builds, like every kind's. A test server enables it
with ``JupyterServer(..., probe_kind=True)`` (``AifabExtension.extra_service_kinds``).

    {"kind": "probe", "name": "web", "behaviour": "http", "gpus": 2}

Behaviours: ``http`` (http.server on a loopback port), ``echo-auth`` (answers with the
Authorization and Cookie headers it got and its path), ``gpus-to-file`` (writes
CUDA_VISIBLE_DEVICES to ``out``, then sleeps), ``tree`` (two children, then waits),
``exit`` (exits with code ``code``).
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

from aifab.api import BadRequest
from aifab.extension.kinds.base import LaunchPlan, ServiceKind, base_env

BEHAVIOURS = ("http", "echo-auth", "gpus-to-file", "tree", "exit")


@dataclass
class ProbeRequest:
    behaviour: str
    gpus: object
    out: str = ""
    code: int = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProbeKind(ServiceKind):
    name = "probe"
    fields = ("behaviour", "out", "code")

    def validate(self, spec: Mapping) -> ProbeRequest:
        self.check_fields(spec)
        behaviour = spec.get("behaviour", "http")
        if behaviour not in BEHAVIOURS:
            raise BadRequest(f"behaviour {behaviour!r}: allowed are {', '.join(BEHAVIOURS)}")
        return ProbeRequest(behaviour, spec.get("gpus"), str(spec.get("out", "")),
                            int(spec.get("code", 0)))

    def default_gpus(self, request: ProbeRequest):
        return request.gpus

    def plan(self, request: ProbeRequest, *, name, gpus, service_dir, api_key) -> LaunchPlan:
        port = free_port() if request.behaviour in ("http", "echo-auth") else 0
        env = base_env(self.ctx.environ, gpus)
        env["PROBE_API_KEY"] = api_key
        return LaunchPlan(argv=[self.ctx.python, "-m", "tests.probe_kind", request.behaviour,
                                str(port), request.out, str(request.code)], env=env, port=port)

    async def ready(self, svc) -> bool:
        if not svc.port:
            return False  # nothing to answer: it stays "starting" until it ends
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", svc.port), 1)
        except (OSError, asyncio.TimeoutError):
            return False
        writer.close()
        return True


class _EchoAuth(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"authorization": self.headers.get("Authorization"),
                           "cookie": self.headers.get("Cookie"), "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main(behaviour: str, port: str, out: str, code: str) -> int:
    if behaviour == "http":
        handler = http.server.SimpleHTTPRequestHandler
        http.server.ThreadingHTTPServer(("127.0.0.1", int(port)), handler).serve_forever()
    if behaviour == "echo-auth":
        http.server.HTTPServer(("127.0.0.1", int(port)), _EchoAuth).serve_forever()
    if behaviour == "gpus-to-file":
        with open(out, "w") as f:
            f.write(os.environ.get("CUDA_VISIBLE_DEVICES", "") + "\n")
        time.sleep(60)
    if behaviour == "tree":
        children = [subprocess.Popen(["sleep", "300"]) for _ in range(2)]
        for child in children:
            child.wait()
    return int(code)


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
