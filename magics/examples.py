"""Small example data for trying %finetune without any download."""

from __future__ import annotations

import json
import random
from pathlib import Path

from aifab.session import ENV_TINY_MODEL


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


def write_chat_records(path: str | Path, n: int = 2000, bad: bool = True) -> Path:
    """Arithmetic chat records for the data-prep tutorial, with three bad records in it
    (broken JSON, a message without content, an unknown role) to show how they are reported."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"messages": [
        {"role": "user", "content": f"What is {i} plus {i % 17}?"},
        {"role": "assistant", "content": f"{i + i % 17}"}]}) for i in range(n)]
    if bad and n > 30:
        lines[9] = '{"messages": [{"role": "user", "content": "half a line'
        lines[19] = json.dumps({"messages": [{"role": "user"}]})
        lines[29] = json.dumps({"messages": [{"role": "robot", "content": "beep"}]})
    path.write_text("\n".join(lines) + "\n")
    return path


TUTORIAL_MODEL_NAME = "tiny-llama"


def tutorial_model() -> str:
    """The model the tutorials use: $AIFAB_TINY_MODEL (the demo hub sets it), else
    ``tiny-llama`` from the shared model cache (a workshop's), else the offline tiny model,
    built once into ~/.cache/aifab (a minute, no download)."""
    import os

    from aifab.models import resolve

    given = os.environ.get(ENV_TINY_MODEL, "")
    if given and Path(given, "config.json").is_file():
        return given
    cached = resolve(TUTORIAL_MODEL_NAME)
    if cached != TUTORIAL_MODEL_NAME:
        return cached
    from .tiny_model import build_cached

    return str(build_cached(Path.home() / ".cache" / "aifab" / "tiny-model"))
