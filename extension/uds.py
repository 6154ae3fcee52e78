"""HTTP over a Unix domain socket with tornado's own client.

vLLM listens on a socket inside the service's 0700 directory (``--uds``), so only the
session's own user can reach it at all — not other users of a shared node, as with a
loopback port. tornado connects wherever its resolver says; this resolver says: the socket.
"""

from __future__ import annotations

import socket

from tornado.httpclient import AsyncHTTPClient
from tornado.netutil import Resolver


class UnixSocketResolver(Resolver):
    def initialize(self, socket_path: str) -> None:
        self.socket_path = socket_path

    async def resolve(self, host, port, family=socket.AF_UNSPEC):
        return [(socket.AF_UNIX, self.socket_path)]


def unix_http_client(socket_path: str, max_clients: int = 64) -> AsyncHTTPClient:
    """A client whose every request goes to ``socket_path`` (use http://localhost/PATH)."""
    return AsyncHTTPClient(force_instance=True, max_clients=max_clients,
                           resolver=UnixSocketResolver(socket_path=socket_path))
