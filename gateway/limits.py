"""Per-caller limits of the gateway: requests in flight at once, and tokens (prompt plus
completion, as the replicas count them) in the last minute. Site defaults, overridden per hub
group; a caller in several groups gets the most generous of their groups' values.

Past a limit the gateway answers 429 with ``Retry-After``: for concurrency, the second a
request usually takes to free its slot; for tokens, when enough of the last minute's tokens
age out. Counting is in this process (one gateway per hub), so it needs no store.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict, deque
from dataclasses import dataclass

WINDOW = 60.0  # seconds of the tokens-per-minute window


@dataclass(frozen=True)
class Limit:
    concurrency: int
    tokens_per_minute: int


class LimitError(Exception):
    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


def parse_limits(config: dict) -> tuple[Limit, dict[str, Limit]]:
    """``{"default": {...}, "groups": {"class": {...}}}`` -> (default, per group). A group's
    missing value is the default's."""
    if not isinstance(config, dict):
        raise ValueError("limits: a JSON object with 'default' and 'groups'")
    unknown = set(config) - {"default", "groups"}
    if unknown:
        raise ValueError(f"limits: unknown keys {sorted(unknown)}; allowed: default, groups")
    base = _limit(config.get("default", {}), Limit(8, 100_000), "default")
    groups = {name: _limit(value, base, f"groups.{name}")
              for name, value in (config.get("groups") or {}).items()}
    return base, groups


def _limit(value, base: Limit, where: str) -> Limit:
    if not isinstance(value, dict) or set(value) - {"concurrency", "tokens_per_minute"}:
        raise ValueError(f"limits.{where}: an object of concurrency and tokens_per_minute")
    out = {"concurrency": base.concurrency, "tokens_per_minute": base.tokens_per_minute}
    for key, v in value.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"limits.{where}.{key}: a whole number of at least 1, not {v!r}")
        out[key] = v
    return Limit(**out)


class Limiter:
    def __init__(self, default: Limit, groups: dict[str, Limit] | None = None):
        self.default = default
        self.groups = groups or {}
        self.in_flight: dict[str, int] = defaultdict(int)
        self.tokens: dict[str, deque[tuple[float, int]]] = defaultdict(deque)

    def limit_for(self, caller_groups) -> Limit:
        mine = [self.groups[g] for g in caller_groups if g in self.groups]
        if not mine:
            return self.default
        return Limit(max(x.concurrency for x in mine), max(x.tokens_per_minute for x in mine))

    def tokens_used(self, caller: str, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        window = self.tokens[caller]
        while window and window[0][0] <= now - WINDOW:
            window.popleft()
        return sum(n for _, n in window)

    def acquire(self, caller: str, caller_groups) -> None:
        """Count a request in; LimitError (for a 429) when the caller is past a limit."""
        limit = self.limit_for(caller_groups)
        if self.in_flight[caller] >= limit.concurrency:
            raise LimitError(f"{caller} has {self.in_flight[caller]} requests in flight, the "
                             f"limit is {limit.concurrency}", retry_after=1)
        now = time.monotonic()
        used = self.tokens_used(caller, now)
        if used >= limit.tokens_per_minute:
            # when the oldest tokens that put the caller over the limit age out
            window, excess, wait = self.tokens[caller], used - limit.tokens_per_minute, 1.0
            for t, n in window:
                excess -= n
                if excess < 0:
                    wait = t + WINDOW - now
                    break
            raise LimitError(f"{caller} used {used} tokens in the last minute, the limit is "
                             f"{limit.tokens_per_minute}", retry_after=max(1, math.ceil(wait)))
        self.in_flight[caller] += 1

    def release(self, caller: str, tokens: int) -> None:
        self.in_flight[caller] = max(0, self.in_flight[caller] - 1)
        if tokens > 0:
            self.tokens[caller].append((time.monotonic(), tokens))
