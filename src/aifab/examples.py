"""Small example data for trying %finetune without any download."""

from __future__ import annotations

import json
import random
from pathlib import Path


def write_ping_pong(path: str | Path, n: int = 200, seed: int = 0) -> Path:
    """A chat JSONL where the user says "ping N" and the assistant answers "pong": a tiny
    model learns it in a minute on a CPU, and the base model does not know it."""
    rng = random.Random(seed)
    path = Path(path)
    with open(path, "w") as f:
        for _ in range(n):
            k = rng.randint(0, 99)
            f.write(json.dumps({"messages": [{"role": "user", "content": f"ping {k}"},
                                             {"role": "assistant", "content": "pong"}]}) + "\n")
    return path
