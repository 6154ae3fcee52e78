"""``aifab-singleuser CMD [ARGS...]``: start the single-user server of a session.

Runs CMD (normally ``jupyterhub-singleuser``) in this process after two things:

* when the hub does not know the port yet (``JUPYTERHUB_SERVICE_URL`` says port 0, as a
  batch spawner's job is told), it picks a free port on this node and reports it to the hub
  (``POST $JUPYTERHUB_API_URL/batchspawner {"port": N}``, the batchspawner protocol) with the
  standard library, before any heavy import — what ``batchspawner-singleuser`` does, minus
  the ~0.5 s of imports it needs for it, and checking the hub's answer;
* it defers the IRI grammar of ``rfc3987_syntax``: jsonschema imports it (through
  jupyter_events) and compiles an Earley parser at import, ~1.5 s of a server's ~3 s start on
  a 2-core machine, for a format check Jupyter never runs at start-up. The real module is
  loaded the first time the check is used.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import socket
import ssl
import sys
import types
import urllib.request
from runpy import run_path
from urllib.parse import urlparse, urlunparse


def defer_rfc3987_syntax() -> None:
    if "rfc3987_syntax" in sys.modules or importlib.util.find_spec("rfc3987_syntax") is None:
        return
    stub = types.ModuleType("rfc3987_syntax")
    stub.__doc__ = "aifab: stands in for rfc3987_syntax until it is first used"

    def is_valid_syntax(term: str, value: str) -> bool:
        del sys.modules["rfc3987_syntax"]
        real = importlib.import_module("rfc3987_syntax")
        stub.is_valid_syntax = real.is_valid_syntax
        return real.is_valid_syntax(term, value)

    stub.is_valid_syntax = is_valid_syntax
    sys.modules["rfc3987_syntax"] = stub


def free_port(ip: str = "") -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def report_port(port: int, env=os.environ) -> None:
    """Tell the hub our port; raise with the hub's answer if it refuses."""
    url = env["JUPYTERHUB_API_URL"].rstrip("/") + "/batchspawner"
    req = urllib.request.Request(
        url, data=json.dumps({"port": port}).encode(), method="POST",
        headers={"Authorization": f"token {env['JUPYTERHUB_API_TOKEN']}",
                 "Content-Type": "application/json"},
    )
    context = None
    if env.get("JUPYTERHUB_SSL_CERTFILE"):  # internal_ssl: the hub wants our client cert
        context = ssl.create_default_context(cafile=env.get("JUPYTERHUB_SSL_CLIENT_CA"))
        context.load_cert_chain(env["JUPYTERHUB_SSL_CERTFILE"], env.get("JUPYTERHUB_SSL_KEYFILE"))
    with urllib.request.urlopen(req, timeout=30, context=context) as resp:
        if resp.status not in (200, 201):
            raise RuntimeError(f"the hub refused our port: HTTP {resp.status}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        sys.exit("usage: aifab-singleuser CMD [ARGS...]")
    defer_rfc3987_syntax()
    service_url = urlparse(os.environ.get("JUPYTERHUB_SERVICE_URL", ""))
    if service_url.port == 0:
        port = free_port(service_url.hostname or "")
        report_port(port)
        os.environ["JUPYTERHUB_SERVICE_URL"] = urlunparse(
            service_url._replace(netloc=f"{service_url.hostname}:{port}"))
    path = shutil.which(argv[0])
    if path is None:
        sys.exit(f"aifab-singleuser: {argv[0]!r} not found on PATH")
    sys.argv = argv
    run_path(path, run_name="__main__")


if __name__ == "__main__":  # pragma: no cover
    main()
