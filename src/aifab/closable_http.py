"""A tornado HTTP client for one proxied request whose connection can be closed from outside:
when the proxy's own client leaves, closing the connection to the service ends the request
there too (vLLM aborts a generation whose connection closed). Tornado's simple client opens a
connection per request anyway; this one only remembers it. Used by the session's proxy
(``aifab.extension.proxy``) and the models gateway (``aifab.gateway``)."""

from __future__ import annotations

from tornado.simple_httpclient import SimpleAsyncHTTPClient
from tornado.tcpclient import TCPClient


class _Connections(TCPClient):
    """A TCPClient that keeps the connections it opened, so that ``close_all`` can end them."""

    def __init__(self, resolver):
        super().__init__(resolver=resolver)
        self.streams: list = []
        self.closed = False

    async def connect(self, *args, **kwargs):
        stream = await super().connect(*args, **kwargs)
        if self.closed:  # the client left while we connected
            stream.close()
        self.streams.append(stream)
        return stream

    def close_all(self) -> None:
        self.closed = True
        for stream in self.streams:
            stream.close()


class OneRequestClient(SimpleAsyncHTTPClient):
    """The client of one proxied request (tornado's simple client opens a connection per
    request anyway): its ``connections`` can be closed when the proxy's own client leaves."""

    def initialize(self, **kwargs) -> None:
        super().initialize(**kwargs)
        self.tcp_client.close()
        self.tcp_client = self.connections = _Connections(self.resolver)
