"""The gateway's usage log: one JSON line per request (``STATE/usage.jsonl``, mode 0600):
time, caller, model, prompt and completion tokens, HTTP status, latency, whether streamed.
Prompts and answers are never written. An owner reads the lines of their own models through
``GET /api/usage``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


class UsageLog:
    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / "usage.jsonl"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file = os.fdopen(fd, "a", buffering=1)  # a line at a time

    def record(self, *, caller: str, model: str, prompt_tokens: int, completion_tokens: int,
               status: int, latency_ms: float, stream: bool) -> None:
        self._file.write(json.dumps({
            "time": round(time.time(), 3), "caller": caller, "model": model,
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "status": status, "latency_ms": round(latency_ms, 1), "stream": stream}) + "\n")

    def lines_for(self, models: set[str], limit: int = 1000) -> list[dict]:
        """The last ``limit`` lines about ``models``."""
        out: list[dict] = []
        with open(self.path) as f:
            for line in f:
                try:
                    item = json.loads(line)
                except ValueError:
                    continue
                if item.get("model") in models:
                    out.append(item)
        return out[-limit:]

    def close(self) -> None:
        self._file.close()
