"""The authenticated proxy of the session services, on jupyter-server-proxy's ProxyHandler.

``/aifab/proxy/NAME/PATH`` goes to the service NAME: vLLM's private Unix socket (``--uds``,
in a 0700 directory: only this server's user can connect at all), a loopback port, or, for a
service on an allocation's node, the node's address over TLS with this server's client
certificate (the service refuses any other: ``aifab.extension.tls``). It is
behind Jupyter's own authentication (the server's token, JupyterHub's login); the service
gets its own API key from here and none of Jupyter's credentials.

From jupyter-server-proxy (jsp) this reuses the handler: authentication in ``prepare``,
websockets (``open``/``proxy_open``, messages, pings, subprotocols, both over the socket),
hop-by-hop header filtering, the upstream URL and ``X-Forwarded-*`` headers, its Unix socket
resolver and Jupyter's activity record. What it changes, and why:

* Every response is streamed chunk by chunk. jsp streams only when the request says exactly
  ``Accept: text/event-stream`` and buffers the whole answer otherwise; the OpenAI clients
  send ``Accept: application/json`` with ``stream=True`` too, so a streamed completion would
  arrive at once at the end.
* A client that leaves ends the request to the service at once. jsp goes on reading from the
  service after its client left (for an unbuffered answer until the end: a completion of
  2000 tokens is generated for nobody); here ``on_connection_close`` closes the connection to
  the service, and vLLM aborts the request.
* Errors are those of the REST API: 403 without Jupyter's credentials (not a redirect to a
  login page), JSON bodies, 404 for an unknown service, 503 for one not running, 502 when
  it does not answer; cookie-authenticated requests need Jupyter's XSRF token (jsp leaves
  that to the proxied app: here the service trusts whatever comes with its key).
* Neither Jupyter's token (header or ``?token=``), cookies nor XSRF token are passed on, and
  the service cannot set cookies, CORS or CSP headers under the Jupyter server's origin.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode

from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.utils import url_path_join
from jupyter_server_proxy.handlers import ProxyHandler
from jupyter_server_proxy.unixsock import UnixResolver
from tornado import httpclient, web
from tornado.simple_httpclient import SimpleAsyncHTTPClient

from aifab.closable_http import OneRequestClient

from . import tls

# ------------------------------------------------------------------ clients of a service

_clients: dict[str, httpclient.AsyncHTTPClient] = {}


def _key(svc) -> str:
    # (a TLS service's client is its own, never a plain one of an earlier service that had
    # the same address)
    return svc.socket or f"{svc.host or '127.0.0.1'}:{svc.port}{'|' + svc.tls if svc.tls else ''}"


_contexts: dict[str, object] = {}


def _ssl_options(svc) -> dict:
    """The TLS settings of a request to a service on a node (none for a local one): one
    context per launch, read once (each launch has new certificates: ``forget`` drops it)."""
    if not svc.tls:
        return {}
    if svc.tls not in _contexts:
        _contexts[svc.tls] = tls.client_context(svc.tls)
    return {"ssl_options": _contexts[svc.tls]}


def service_http_client(svc) -> httpclient.AsyncHTTPClient:
    """The client that reaches the service (its Unix socket, or its loopback port): one per
    socket path, kept until ``forget(svc)``. Use it with ``service_base_url(svc)``."""
    key = _key(svc)
    if key not in _clients:
        _clients[key] = (
            SimpleAsyncHTTPClient(force_instance=True, max_clients=64,
                                  resolver=UnixResolver(socket_path=svc.socket))
            if svc.socket else httpclient.AsyncHTTPClient(force_instance=True, max_clients=64,
                                                          defaults=_ssl_options(svc)))
    return _clients[key]


def service_base_url(svc) -> str:
    """``http://localhost`` for a socket (the resolver connects to the socket whatever the
    host), ``http://127.0.0.1:PORT`` for a port, ``https://NODE:PORT`` on a node."""
    if svc.socket:
        return "http://localhost"
    return f"{'https' if svc.tls else 'http'}://{_url_host(svc.host)}:{svc.port}"


def _url_host(host: str) -> str:
    """A host as a URL has it: an IPv6 address in brackets."""
    host = host or "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def forget(svc) -> None:
    """The service ended: close and drop its client."""
    _contexts.pop(svc.tls, None)
    client = _clients.pop(_key(svc), None)
    if client is not None:
        client.close()


JUPYTER_QUERY_CREDENTIALS = frozenset({"token", "_xsrf"})


# ------------------------------------------------------------------------ the proxy

# request headers not passed on: Jupyter's credentials stay here (the service gets its key
# instead), the Host of the Jupyter server, and what tornado sets itself. Hop-by-hop headers
# are jsp's to drop.
_NOT_PASSED_ON = ("Authorization", "Cookie", "X-XSRFToken", "Host", "Content-Length",
                  "Accept-Encoding")
# response headers not passed back: framing (tornado's own), the server's identity, and what
# the service must not set for the Jupyter server's origin (access-control-*: see _header)
_NOT_PASSED_BACK = {"content-length", "transfer-encoding", "connection", "keep-alive", "te",
                    "trailer", "upgrade", "proxy-authenticate", "proxy-authorization",
                    "server", "date", "set-cookie", "content-security-policy"}


class ServiceProxyHandler(ProxyHandler, APIHandler):
    """/aifab/proxy/NAME/PATH → the service NAME, with its API key.

    An APIHandler too: JSON errors, 403 (not a login redirect) without Jupyter's credentials,
    Jupyter's origin check and Content-Security-Policy. The service record, ``self.svc``,
    is looked up in ``prepare`` once the user is known, so a websocket for an unknown or a
    stopped service is refused before the handshake."""

    svc = None
    _upstream: OneRequestClient | None = None
    _client_left = False

    # --- authentication and the service

    async def prepare(self) -> None:
        if self.request.method == "OPTIONS":
            # a CORS preflight carries no credentials: Jupyter answers it (APIHandler.options)
            await APIHandler.prepare(self)
            return
        await super().prepare()  # jsp: Jupyter's auth on every method, websockets included
        self.svc = self._service(self.path_kwargs["name"])

    def get_login_url(self) -> str:
        return APIHandler.get_login_url(self)  # raises 403: no redirect for a proxied API

    def check_xsrf_cookie(self):
        # jsp leaves XSRF to the proxied app; the service trusts anything with its key, so a
        # cookie-authenticated request needs Jupyter's XSRF token, as for Jupyter's own API
        return JupyterHandler.check_xsrf_cookie(self)

    def _service(self, name: str):
        try:
            svc = self.settings["aifab_services"].get(name)
        except Exception as exc:
            status = getattr(exc, "http_status", None) or getattr(exc, "status", None)
            if not isinstance(status, int):
                raise
            raise web.HTTPError(status, str(exc).replace("%", "%%")) from None
        if svc.status not in ("starting", "ready"):
            raise web.HTTPError(503, f"service {name!r} is "
                                     f"{getattr(svc.status, 'value', svc.status)}")
        if svc.tls and not svc.port:
            raise web.HTTPError(503, f"service {name!r} is starting on its node and does not "
                                     "listen yet")
        if not (svc.socket or svc.port):
            raise web.HTTPError(404, f"service {name!r} serves nothing to proxy to")
        self.unix_socket = svc.socket or None  # jsp's: connect to this socket
        self.proxy_base = f"aifab/proxy/{name}"  # jsp's X-Forwarded-Context and the like
        return svc

    def _check_host_allowlist(self, host: str) -> bool:
        # jsp allows localhost only; the host here is never the request's own: it is where the
        # service record says the service listens (loopback, or its node for a service --on
        # an allocation, which only answers this server's client certificate)
        return host == self._upstream_address()[0]

    def _upstream_address(self) -> tuple[str, int]:
        # over a socket the host is only a name (jsp requires "localhost"), the port unused
        if self.svc.socket:
            return ("localhost", 80)
        return (_url_host(self.svc.host), self.svc.port)

    # --- what goes to the service

    def get_request_headers_override(self) -> dict:
        return {"Authorization": f"Bearer {self.svc.api_key}"}

    def proxy_request_headers(self):
        headers = self.request.headers.copy()
        for name in _NOT_PASSED_ON:
            headers.pop(name, None)
        headers.update(self.get_request_headers_override())
        return headers

    def get_client_uri(self, protocol, host, port, proxied_path):
        if self.svc.tls:
            protocol = {"http": "https", "ws": "wss"}[protocol]
        uri = super().get_client_uri(protocol, host, port, proxied_path)
        if not self.request.query:
            return uri
        # Jupyter's ?token= and ?_xsrf= (its XSRF token, as a form field) stay here; the
        # rest of the query goes on
        uri = uri[:-len(self.request.query) - 1]
        params = [(k, v) for k, v in parse_qsl(self.request.query, keep_blank_values=True)
                  if k not in JUPYTER_QUERY_CREDENTIALS]
        return f"{uri}?{urlencode(params)}" if params else uri

    def proxy_request_options(self) -> dict:
        # a long generation may take its time; allow_nonstandard_methods: a PATCH or DELETE
        # with or without a body goes on as it came
        return dict(follow_redirects=False, connect_timeout=20.0, request_timeout=3600.0,
                    allow_nonstandard_methods=True, **_ssl_options(self.svc))

    # --- the methods (tornado passes the route's groups by name: name, path)

    async def http_get(self, name: str, path: str) -> None:
        await self.proxy(name, path)

    async def post(self, name: str, path: str) -> None:
        await self.proxy(name, path)

    put = delete = patch = head = post

    options = APIHandler.options

    async def open(self, name: str, path: str) -> None:
        if self.svc.tls:
            # jsp's websocket client takes no TLS settings (no client certificate)
            self.close(1011, "websockets are not proxied to a service on an allocation's node")
            return
        host, port = self._upstream_address()
        await self.proxy_open(host, port, "/" + path)

    async def proxy(self, name: str, path: str) -> None:
        host, port = self._upstream_address()
        await super().proxy(host, port, "/" + path)

    async def _proxy_buffered(self, host, port, proxied_path, body, client):
        # jsp's path for everything but "Accept: text/event-stream": always stream instead
        await self._proxy_progressive(host, port, proxied_path, body, client)

    async def _proxy_progressive(self, host, port, proxied_path, body, client):
        """Pass the answer on chunk by chunk, as the service writes it.

        jsp's client for this request is not used: ours remembers its connection, so that
        ``on_connection_close`` can close it."""
        client.close()
        self._upstream = OneRequestClient(
            force_instance=True,
            resolver=UnixResolver(socket_path=self.unix_socket) if self.unix_socket else None)
        seen: set[str] = set()
        started = False

        def on_header(line: str) -> None:
            line = line.rstrip("\r\n")
            if line.startswith("HTTP/"):
                parts = line.split(" ", 2)
                self.set_status(int(parts[1]), parts[2] if len(parts) > 2 and parts[2] else None)
            elif ":" in line:
                name, value = (s.strip() for s in line.split(":", 1))
                self._header(name, value, seen)

        def on_chunk(chunk: bytes) -> None:
            nonlocal started
            if self._client_left:
                return  # (its connection is being closed: on_connection_close)
            started = True
            self.write(chunk)
            self.flush()

        request = self._build_proxy_request(host, port, proxied_path, body,
                                            header_callback=on_header,
                                            streaming_callback=on_chunk)
        name = self.svc.name
        try:
            await self._upstream.fetch(request, raise_error=False)
        except (OSError, httpclient.HTTPClientError) as exc:
            if self._client_left:
                self.log.info("aifab proxy: the client left; closed the request to %s%s",
                              name, proxied_path)
            elif not started:
                raise web.HTTPError(502, f"service {name!r} is not answering: "
                                         f"{str(exc).replace('%', '%%')}") from None
            else:
                self.log.warning("aifab proxy: %s%s broke off: %s", name, proxied_path, exc)
        finally:
            self._upstream.close()
            self._upstream = None
            self._done()

    def _header(self, name: str, value: str, seen: set[str]) -> None:
        key = name.lower()
        if key in _NOT_PASSED_BACK or key.startswith("access-control-"):
            return
        if key == "location" and value.startswith("/") and not value.startswith("//"):
            # a redirect within the service stays under its proxy path
            value = url_path_join(self.base_url, self.proxy_base, value)
        if key in seen:
            self.add_header(name, value)  # a header given more than once (Link, Vary...)
        else:
            seen.add(key)
            self.set_header(name, value)  # replaces Jupyter's default (Content-Type...)

    # --- the end of a request

    def on_connection_close(self) -> None:
        # The client left (a notebook interrupted, a browser tab closed). jsp keeps reading
        # from the service until the answer is complete, so vLLM would go on generating for
        # nobody: close the connection to it, which vLLM sees and aborts the request.
        self._client_left = True
        if self._upstream is not None:
            self._upstream.connections.close_all()
        super().on_connection_close()  # jsp: a websocket's connection to the service

    def on_close(self) -> None:
        super().on_close()
        if hasattr(self, "ws"):  # a websocket session ended
            self._done()

    def _done(self) -> None:
        """A proxied request (or websocket) ended: it counts as the session's activity."""
        self._record_activity()  # jsp's: Jupyter's own last_activity_times
        activity = self.settings.get("aifab_activity")
        if activity is not None:
            activity.touch()
