"""Tokens/s of %finetune (the session services' trainer) vs a plain TRL SFTTrainer script with
the same tiny model, data and settings, alternating, on the CPU.

    .venv/bin/python -m benchmarks.finetune_cpu [--runs 3] [--steps 150]

Both report the Trainer's own train_tokens_per_second. Last line:
{"bench": "finetune_cpu", "plain_tps": .., "aifab_tps": .., "ratio": ..}
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._serving import jupyter_server, tiny_model


def chat_data(path: Path, n: int = 2000) -> Path:
    rng = random.Random(0)
    words = "the a model session gpu slurm node train serve token batch loss".split()
    with open(path, "w") as f:
        for _ in range(n):
            q = " ".join(rng.choice(words) for _ in range(rng.randint(8, 40)))
            a = " ".join(rng.choice(words) for _ in range(rng.randint(8, 60)))
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a}]}) + "\n")
    return path


def aifab_once(server, model, data, out: Path, steps: int, i: int) -> float:
    import os

    os.environ["AIFAB_SERVER_URL"], os.environ["AIFAB_SERVER_TOKEN"] = server.url, server.token
    from aifab.magics.finetuning import finetune

    run = finetune(str(model), str(data), name=f"bench-{i}", output=str(out), max_steps=steps,
                   lr=1e-3, seq_len=256, batch_size=8).wait(1800)
    done = next(m for m in run.metrics() if m.get("event") == "done")
    return done["train_tokens_per_second"]


def plain_once(model, data, out: Path, steps: int) -> float:
    r = subprocess.run([sys.executable, "-m", "benchmarks.plain_sft", "--model", str(model),
                        "--data", str(data), "--output", str(out), "--max-steps", str(steps)],
                       capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])["train_tokens_per_second"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="aifab-ft-bench-"))
    model, data = tiny_model(), chat_data(tmp / "chat.jsonl")
    server = jupyter_server()
    tps: dict[str, list[float]] = {"plain": [], "aifab": []}
    try:
        for i in range(args.runs):
            for kind in (("plain", "aifab") if i % 2 == 0 else ("aifab", "plain")):
                out = tmp / f"{kind}-{i}"
                tps[kind].append(plain_once(model, data, out, args.steps) if kind == "plain"
                                 else aifab_once(server, model, data, out, args.steps, i))
            print(f"run {i + 1}: plain {tps['plain'][-1]:.0f} aifab {tps['aifab'][-1]:.0f} "
                  "tokens/s", file=sys.stderr)
    finally:
        server.stop()
    plain, aifab = statistics.median(tps["plain"]), statistics.median(tps["aifab"])
    print(json.dumps({"bench": "finetune_cpu", "plain_tps": round(plain), "aifab_tps":
                      round(aifab), "ratio": round(aifab / plain, 3), "runs": args.runs,
                      "steps": args.steps, "plain_all": [round(x) for x in tps["plain"]],
                      "aifab_all": [round(x) for x in tps["aifab"]]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
