"""What the models gateway sends to a published route instead of the publication's key:
``Authorization: Bearer aifab1.TIME.SIG``, SIG an HMAC-SHA256 of the time and the route
with the key. The router between them has no credentials of its own and passes the header
on as it is; a header that leaks there is good for one route for ``WINDOW`` seconds, and the
key never leaves the gateway or the owner's server. (The body is not signed: vLLM's router
rewrites it on the way.)"""

from __future__ import annotations

import hashlib
import hmac
import time

WINDOW = 60  # seconds a signature is good for, either side of now (clocks of two hosts)


def _mac(key: str, stamp: str, route: str) -> str:
    return hmac.new(key.encode(), f"{stamp}\n{route}".encode(), hashlib.sha256).hexdigest()


def sign(key: str, route: str, now: float | None = None) -> str:
    """The ``Authorization`` value for a request to ``route`` (e.g. '/v1/chat/completions')."""
    stamp = str(int(time.time() if now is None else now))
    return f"Bearer aifab1.{stamp}.{_mac(key, stamp, route)}"


def verify(key: str, route: str, header: str, now: float | None = None) -> bool:
    try:
        scheme, stamp, mac = header.removeprefix("Bearer ").split(".")
        age = abs((time.time() if now is None else now) - int(stamp))
    except ValueError:
        return False
    return scheme == "aifab1" and age <= WINDOW and hmac.compare_digest(
        mac.encode(), _mac(key, stamp, route).encode())
