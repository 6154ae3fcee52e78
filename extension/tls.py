"""Mutual TLS between the session's proxy and a service on an allocation's node.

On the session's own machine vLLM listens on a Unix socket in a 0700 folder: nobody else can
connect at all. A service on a compute node must listen on the node's network, where every
user of the node and of the cluster network can connect, and vLLM leaves ``/tokenize``,
``/invocations``, ``/metrics`` and more open without its API key. So a service ``--on`` an
allocation gets a certificate authority of its own (one per launch, made here with certipy,
the library JupyterHub's ``internal_ssl`` uses): vLLM serves TLS with a certificate of that
CA and **requires a client certificate of it** (uvicorn's ``ssl_cert_reqs=CERT_REQUIRED``),
and only the session's proxy holds one. Anyone else is refused in the TLS handshake, before
any HTTP: no endpoint of the service answers them, key or no key.

The files are in the service's folder (mode 0700, the user's own; the node reads them
through the shared file system). The CA signs these two certificates and its key is then
thrown away, so the proxy trusts that CA alone and checks no host name: a certificate of
this CA *is* the service.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path

TLS_DIR = "tls"
_CA, _SERVICE, _PROXY = "aifab-service-ca", "aifab-service", "aifab-proxy"


def make_service_tls(host: str) -> dict[str, bytes]:
    """A fresh CA, the service's certificate (for ``host``) and the proxy's client
    certificate: {relative path: contents}, for ``write_service_tls``. Three RSA keys take
    about 0.2 s: call it off the event loop (the kind does, in its validation)."""
    from certipy import Certipy

    with tempfile.TemporaryDirectory() as tmp:
        certipy = Certipy(store_dir=tmp)
        certipy.create_ca(_CA, years=1)
        ip = host.replace(".", "").isdigit() or ":" in host
        certipy.create_signed_pair(_SERVICE, _CA, years=1,
                                   alt_names=[f"IP:{host}" if ip else f"DNS:{host}"])
        certipy.create_signed_pair(_PROXY, _CA, years=1)
        # the CA's key has signed all it ever will: it is not kept
        return {str(f.relative_to(tmp)): f.read_bytes()
                for name in (_CA, _SERVICE, _PROXY) for f in Path(tmp, name).iterdir()
                if f.name != f"{_CA}.key"}


def write_service_tls(service_dir: Path, files: dict[str, bytes]) -> Path:
    """The files under ``service_dir/tls``, only the user's own. Returns that folder."""
    tls = Path(service_dir) / TLS_DIR
    tls.mkdir(mode=0o700)
    for rel, data in files.items():
        path = tls / rel
        path.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return tls


def _files(tls: Path, name: str) -> tuple[str, str]:
    return str(tls / name / f"{name}.crt"), str(tls / name / f"{name}.key")


def vllm_tls_args(tls: Path) -> list[str]:
    """vLLM's (uvicorn's) flags: serve TLS, and demand a client certificate of the CA."""
    cert, key = _files(tls, _SERVICE)
    ca, _ = _files(tls, _CA)
    return ["--ssl-certfile", cert, "--ssl-keyfile", key, "--ssl-ca-certs", ca,
            "--ssl-cert-reqs", str(int(ssl.CERT_REQUIRED))]


def client_context(tls: str | Path) -> ssl.SSLContext:
    """The proxy's side: trust only the service's CA, present the proxy's certificate."""
    tls = Path(tls)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ca, _ = _files(tls, _CA)
    ctx.load_verify_locations(ca)
    # (a certificate of this per-service CA is the service: see the module's docstring)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(*_files(tls, _PROXY))
    return ctx
