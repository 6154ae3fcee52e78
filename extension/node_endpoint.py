"""Runs on an allocation's node, as the job step of a service ``--on`` the allocation: gives
the service a port on the node's address, tells the Jupyter server which, and supervises it.

    python -m aifab.extension.node_endpoint --host ADDR --endpoint FILE -- PROGRAM ARGS...

The server cannot choose a port on another machine, so this picks a free one there (bind to
port 0, as batchspawner's single-user servers do on their nodes), writes ``{"host", "port",
"node"}`` to FILE (in the service's folder, which the node shares with the server; mode
0600, replaced atomically) and runs ``PROGRAM ARGS... --host ADDR --port PORT``. What the
program listens on is its own business (vLLM: TLS that demands the server's client
certificate, see ``aifab.extension.tls``).

It also gives the program a private temporary folder on the node (vLLM's ZeroMQ sockets go
there: node-local, short, mode 0700) and removes it at the end, and narrows the step's GPUs
to the ledger's share (``AIFAB_GPU_POSITIONS``). Signals from srun are passed on; its exit
status is the program's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

from aifab.extension.steps import pick_gpus

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def write_endpoint(path: str, host: str, port: int) -> None:
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"host": host, "port": port, "node": socket.gethostname(),
                   "pid": os.getpid()}, f)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="aifab.extension.node_endpoint")
    p.add_argument("--host", required=True, help="the node's address the server reaches")
    p.add_argument("--endpoint", required=True, help="where to write host and port")
    p.add_argument("program", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        p.error("no program to run")
    env = dict(os.environ)
    pick_gpus(env)
    private = tempfile.mkdtemp(prefix="aifab-step-")  # 0700, a name nobody took first
    env["TMPDIR"] = private
    port = free_port(args.host)
    try:
        child = subprocess.Popen([*program, "--host", args.host, "--port", str(port)], env=env)
        for sig in FORWARDED:
            signal.signal(sig, lambda s, _f: child.send_signal(s))
        try:
            write_endpoint(args.endpoint, args.host, port)
        except OSError:
            child.terminate()  # nobody would ever find it
            child.wait()
            raise
        return child.wait()
    finally:
        shutil.rmtree(private, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
