"""Chat completions through the authenticated proxy vs directly to vLLM: the same server,
200 requests each at concurrency 8, in alternating halves.

    .venv/bin/python -m benchmarks.serve_proxy [--requests 200] [--concurrency 8]

Last line: {"bench": "serve_proxy", "direct_rps": .., "proxy_rps": .., "ratio": ..,
            "added_p50_ms": ..}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from benchmarks._serving import jupyter_server, tiny_model, uds_client

BODY = {"model": "bench", "max_tokens": 16, "temperature": 0,
        "messages": [{"role": "user", "content": "ping 7"}]}


def burst(post, n: int, concurrency: int) -> tuple[float, list[float]]:
    def one(_):
        t0 = time.perf_counter()
        r = post(json=BODY)
        r.raise_for_status()
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, range(n)))
    return time.perf_counter() - t0, latencies


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    server = jupyter_server()
    try:
        r = server.request("POST", "aifab/api/services",
                           json={"kind": "vllm", "name": "bench", "model": str(tiny_model())})
        r.raise_for_status()
        svc = server.wait_service("bench", "ready", 600)
        # straight to vLLM's socket with its key (read from the record, as its owner may)
        key = json.loads(open(f"{svc['dir']}/record.json").read())["api_key"]
        to_vllm = uds_client(svc["socket"], key)
        # the same client library on both sides, so only the proxy differs
        to_proxy = httpx.Client(base_url=f"{server.url}aifab/proxy/bench", timeout=120,
                                headers={"Authorization": f"token {server.token}"})
        posts = {"direct": lambda json: to_vllm.post("/v1/chat/completions", json=json),
                 "proxy": lambda json: to_proxy.post("/v1/chat/completions", json=json)}
        burst(posts["direct"], 16, args.concurrency)  # warm-up
        half = args.requests // 2
        res = {"direct": [0.0, []], "proxy": [0.0, []]}
        for kind in ("direct", "proxy", "proxy", "direct", "direct", "proxy"):
            wall, lat = burst(posts[kind], half // 3 * 2, args.concurrency)
            res[kind][0] += wall
            res[kind][1] += lat
            print(f"{kind}: {len(lat) / wall:.1f} req/s", file=sys.stderr)
    finally:
        server.stop()
    n = len(res["direct"][1])
    direct_rps, proxy_rps = n / res["direct"][0], len(res["proxy"][1]) / res["proxy"][0]
    p50 = {k: statistics.median(v[1]) for k, v in res.items()}
    print(json.dumps({"bench": "serve_proxy", "requests": n, "concurrency": args.concurrency,
                      "direct_rps": round(direct_rps, 1), "proxy_rps": round(proxy_rps, 1),
                      "ratio": round(proxy_rps / direct_rps, 3),
                      "direct_p50_ms": round(p50["direct"] * 1000, 1),
                      "proxy_p50_ms": round(p50["proxy"] * 1000, 1),
                      "added_p50_ms": round((p50["proxy"] - p50["direct"]) * 1000, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
