"""One replica of a deployment, as the batch step of its Slurm job
(``python -m aifab.extension.replica``; the models gateway submits it as the owner).

It runs vLLM as a session does (``aifab.extension.kinds.vllm``: a private Unix socket in a
0700 runtime folder, vLLM's own random key), and in front of it a small HTTP server on the
node, for the gateway's router only:

* ``/health`` answers 200 once vLLM is ready as the session services define it (health, the
  model listed, one token generated), so the router sends nothing to a replica still loading;
* ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings`` need the
  gateway's signature (``aifab.signing``, made with the deployment's key, which only the
  owner and the gateway can read) and go to vLLM with vLLM's key, streamed, ended on vLLM when
  the caller leaves; nothing else of vLLM's is reachable.

Why not the session's proxy (jupyter-server-proxy's ``ProxyHandler``): it needs a Jupyter
server, which a replica does not have; this is its streaming path without Jupyter.

It writes ``DIR/JOB/endpoint.json`` (node, port, vLLM's pid) for the gateway, and exits with
vLLM: a replica whose vLLM died ends its job, and the gateway starts another.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

from jupyter_server_proxy.unixsock import UnixResolver
from tornado import httpclient, web
from tornado.httpserver import HTTPServer

from aifab import signing, slurm, supervisor
from aifab.closable_http import OneRequestClient

from .kinds.vllm import vllm_argv, vllm_env

ROUTES = r"health|v1/models|v1/chat/completions|v1/completions|v1/embeddings"


class Replica:
    def __init__(self, key: str, socket_path: str, vllm_key: str, served_name: str):
        self.key, self.socket, self.vllm_key = key, socket_path, vllm_key
        self.served_name = served_name
        self.ready = False

    def client(self) -> OneRequestClient:
        return OneRequestClient(force_instance=True,
                                resolver=UnixResolver(socket_path=self.socket))

    async def wait_ready(self, proc) -> None:
        """vLLM's /health says 200 before the model can serve: ready is one token made."""
        client = httpclient.AsyncHTTPClient(force_instance=True,
                                            resolver=UnixResolver(socket_path=self.socket))
        auth = {"Authorization": f"Bearer {self.vllm_key}", "Content-Type": "application/json"}
        while proc.poll() is None:
            try:
                r = await client.fetch("http://localhost/v1/completions", method="POST",
                                       headers=auth, request_timeout=60, raise_error=False,
                                       body=json.dumps({"model": self.served_name,
                                                        "prompt": "Hello", "max_tokens": 1}))
                if r.code == 200:
                    self.ready = True
                    return
            except OSError:
                pass
            await asyncio.sleep(1)


class FrontHandler(web.RequestHandler):
    _upstream: OneRequestClient | None = None
    _left = False

    @property
    def replica(self) -> Replica:
        return self.settings["replica"]

    async def get(self, path: str) -> None:
        if path == "health" and not self.replica.ready:
            raise web.HTTPError(503, "vLLM is loading")
        await self._proxy(path)

    async def post(self, path: str) -> None:
        if path == "health":
            raise web.HTTPError(405)
        await self._proxy(path)

    async def _proxy(self, path: str) -> None:
        if path != "health" and not signing.verify(
                self.replica.key, "/" + path, self.request.headers.get("Authorization", "")):
            raise web.HTTPError(401, "this replica answers the models gateway only")
        started = False

        def on_header(line: str) -> None:
            line = line.rstrip("\r\n")
            if line.startswith("HTTP/"):
                self.set_status(int(line.split(" ", 2)[1]))
            elif line.lower().startswith("content-type:"):
                self.set_header("Content-Type", line.split(":", 1)[1].strip())

        def on_chunk(chunk: bytes) -> None:
            nonlocal started
            if not self._left:
                started = True
                self.write(chunk)
                self.flush()

        self._upstream = self.replica.client()
        request = httpclient.HTTPRequest(
            f"http://localhost/{path}", method=self.request.method,
            body=self.request.body if self.request.method == "POST" else None,
            headers={"Authorization": f"Bearer {self.replica.vllm_key}",
                     "Content-Type": self.request.headers.get("Content-Type",
                                                              "application/json")},
            header_callback=on_header, streaming_callback=on_chunk, follow_redirects=False,
            connect_timeout=10, request_timeout=3600)
        try:
            await self._upstream.fetch(request, raise_error=False)
        except (OSError, httpclient.HTTPClientError) as exc:
            if self._left:
                return
            if not started:
                raise web.HTTPError(502, f"vLLM is not answering: {exc}".replace(
                    "%", "%%")) from None
        finally:
            self._upstream.close()
            self._upstream = None
        if not self._left:
            self.finish()

    def on_connection_close(self) -> None:
        self._left = True  # the router left: end the request on vLLM too
        if self._upstream is not None:
            self._upstream.connections.close_all()


def listen_address(node: str) -> tuple[int, str]:
    """Where the front listens: the node's address as Slurm knows it (``NodeAddr``, what the
    gateway connects to), not every interface of the node; loopback outside a Slurm job."""
    if "SLURM_JOB_ID" not in os.environ:
        return socket.AF_INET, "127.0.0.1"
    out = slurm.run(["scontrol", "show", "node", "-o", node])
    m = re.search(r"\bNodeAddr=(\S+)", out)
    info = socket.getaddrinfo(m.group(1) if m else node, 0, type=socket.SOCK_STREAM)[0]
    return info[0], info[4][0]


async def run(args) -> int:
    deploy_dir = Path(args.dir)
    job = os.environ.get("SLURM_JOB_ID", "local")
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    key = (deploy_dir / "key").read_text().strip()
    run_dir = tempfile.mkdtemp(prefix="aifab-replica-")  # 0700, short: socket paths
    gpus = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g] \
        if args.gpus else []
    replica = Replica(key, os.path.join(run_dir, "vllm.sock"), secrets.token_urlsafe(32),
                      args.served_name)
    argv = vllm_argv(sys.executable, args.model, socket_path=replica.socket,
                     served_name=args.served_name, tensor_parallel=max(1, args.gpus),
                     cpu=not args.gpus, max_model_len=args.max_model_len or None)
    os.makedirs(os.path.join(run_dir, "cache"))
    os.makedirs(os.path.join(run_dir, "tmp"))
    env = vllm_env(os.environ, gpus, run_dir, cpu=not args.gpus, api_key=replica.vllm_key)
    if not args.gpus:
        # vLLM's CPU build pins its threads to the machine's first cores ('auto'), every
        # replica to the same ones where Slurm confines nothing (task/none): two replicas on
        # one node then share one core and the second never finishes loading. The job's
        # cgroup, where there is one, is the limit that matters; a site may set its own.
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    proc, started = supervisor.launch(argv, env=env, cwd=run_dir,
                                      log_path=deploy_dir / f"vllm-{job}.log")
    # (a request body larger than this is refused before its signature is even read)
    server = HTTPServer(web.Application([(rf"/({ROUTES})", FrontHandler)], replica=replica),
                        max_body_size=8 * 1024 * 1024)
    family, address = listen_address(node)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, 0))
    sock.listen(128)
    sock.setblocking(False)
    server.add_sockets([sock])
    endpoint = deploy_dir / job / "endpoint.json"
    endpoint.parent.mkdir(exist_ok=True)
    endpoint.write_text(json.dumps({"node": node, "port": sock.getsockname()[1],
                                    "vllm_pid": proc.pid}))
    print(f"aifab replica: job {job} on {node}, port {sock.getsockname()[1]}, vLLM pid "
          f"{proc.pid}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ready = asyncio.ensure_future(replica.wait_ready(proc))
    try:
        while not stop.is_set() and proc.poll() is None:
            try:
                await asyncio.wait_for(stop.wait(), 1)
            except asyncio.TimeoutError:
                pass
        code = proc.poll()
        print(f"aifab replica: {'stopping' if code is None else f'vLLM exited {code}'}",
              flush=True)
        return 0 if code is None else (code or 1)
    finally:
        ready.cancel()
        server.stop()
        await supervisor.stop_tree(proc.pid, started, grace=10, reap=proc.poll)
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description="one replica of a models-gateway deployment")
    p.add_argument("--dir", required=True, help="the deployment's folder (its key is there)")
    p.add_argument("--model", required=True)
    p.add_argument("--served-name", required=True)
    p.add_argument("--gpus", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=0)
    sys.exit(asyncio.run(run(p.parse_args())))


if __name__ == "__main__":
    main()
