"""Work --on an allocation, without Slurm: which allocations a run or a service may go on
(the same refusals for both), the magic's option, and the mutual TLS that keeps a service on
a node to the session's proxy (a real TLS server on loopback)."""

from __future__ import annotations

import socket
import ssl
import threading
from types import SimpleNamespace

import pytest

from aifab.api import BadRequest
from aifab.extension import steps, tls


def _manager(**allocs):
    return SimpleNamespace(allocations={
        name: SimpleNamespace(name=name, live=state != "ended", state=state,
                              reason="Resources" if state == "queued" else "",
                              request={"nodes": nodes, "gpus": 2}, job_id="9", nodes=["n1"])
        for name, (state, nodes) in allocs.items()})


@pytest.mark.parametrize("name, message", [
    ("nope", "on='nope': no such allocation of this session (held: wait, big, run); request "
             "one with %alloc or aifab.allocate()"),
    ("wait", "on='wait': the allocation is queued (Resources), not running: start it once "
             "the allocation runs"),
    ("big", "on='big': the allocation has 2 nodes; one node, please"),
])
def test_only_a_running_one_node_allocation_of_the_session_takes_work(name, message):
    manager = _manager(wait=("queued", 1), big=("running", 2), run=("running", 1),
                       old=("ended", 1))
    with pytest.raises(BadRequest) as refused:
        steps.running_allocation(manager, name, one_node="one node, please")
    assert str(refused.value) == message
    alloc = steps.running_allocation(manager, "run", one_node="")
    assert steps.allocation_gpus(alloc) == ("run:0", "run:1")
    assert steps.gpu_positions(alloc, ["run:1"]) == {"AIFAB_GPU_POSITIONS": "1"}


def test_serve_on_an_allocation_from_the_magic():
    from aifab.magics.serve_magic import parse_serve

    command, opts, extra = parse_serve("tiny --on infer --gpus 2 -- --seed 1")
    assert (command, opts.model, opts.on, opts.gpus, extra) == (
        "serve", "tiny", "infer", "2", ["--seed", "1"])


def test_the_tls_flags_are_aifabs_own():
    from aifab.extension.kinds.vllm import RESERVED_FLAGS

    assert {"--ssl-ca-certs", "--ssl-cert-reqs", "--ssl-keyfile", "--host",
            "--port"} <= RESERVED_FLAGS


def _tls_server(certs) -> tuple[socket.socket, ssl.SSLContext]:
    """What vLLM's flags ask uvicorn for: its certificate, and a client's demanded."""
    flags = tls.vllm_tls_args(certs)
    args = dict(zip(flags[::2], flags[1::2], strict=True))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args["--ssl-certfile"], args["--ssl-keyfile"])
    ctx.load_verify_locations(args["--ssl-ca-certs"])
    ctx.verify_mode = ssl.VerifyMode(int(args["--ssl-cert-reqs"]))
    sock = socket.create_server(("127.0.0.1", 0))
    return sock, ctx


def test_a_service_on_a_node_answers_only_its_proxys_certificate(tmp_path):
    (tmp_path / "svc").mkdir()
    certs = tls.write_service_tls(tmp_path / "svc", tls.make_service_tls("127.0.0.1"))
    # only the user's own, and the CA's key is gone (it signed all it ever will)
    assert all(p.stat().st_mode & 0o077 == 0 for p in [certs, *certs.rglob("*")])
    assert not list(certs.rglob("aifab-service-ca.key"))
    other = tls.write_service_tls(tmp_path, tls.make_service_tls("127.0.0.1"))
    sock, server_ctx = _tls_server(certs)
    port = sock.getsockname()[1]
    results: list[str] = []

    def serve(n: int) -> None:
        for _ in range(n):
            conn, _ = sock.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls_conn:
                    tls_conn.sendall(b"hello")
                    results.append("served")
            except (ssl.SSLError, OSError):
                results.append("refused")

    no_cert = ssl.create_default_context()
    no_cert.check_hostname, no_cert.verify_mode = False, ssl.CERT_NONE
    # another service's proxy certificate, the service's own not checked: the service must
    # be the one to refuse it
    foreign = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    foreign.check_hostname, foreign.verify_mode = False, ssl.CERT_NONE
    foreign.load_cert_chain(other / "aifab-proxy" / "aifab-proxy.crt",
                            other / "aifab-proxy" / "aifab-proxy.key")
    clients = [tls.client_context(certs), foreign, no_cert]
    thread = threading.Thread(target=serve, args=(len(clients),), daemon=True)
    thread.start()
    got = []
    for ctx in clients:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                    ctx.wrap_socket(raw) as conn:
                got.append(conn.recv(5))
        except (ssl.SSLError, OSError):
            got.append(b"")
    thread.join(10)
    sock.close()
    # the proxy's certificate: served; another service's, or none: nothing
    assert got == [b"hello", b"", b""]
    assert results == ["served", "refused", "refused"]


def test_a_run_on_several_nodes_meets_through_the_static_rendezvous():
    from aifab.api import FineTuneOptions
    from aifab.extension.kinds.finetune import trainer_argv

    o = FineTuneOptions(model="/m", data="/d.jsonl", name="duo", output="/o", nodes=2,
                        on="pair")
    argv = trainer_argv("/py", o, 0, master="10.0.0.11:29601")
    # each node's rank from Slurm, torchrun's static rendezvous at the first node's address;
    # never c10d (its store's state is unpickled by every agent)
    assert argv[:3] == ["/py", "-m", "aifab.extension.node_rank"]
    assert argv[3:6] == ["/py", "-m", "torch.distributed.run"]
    assert {"--nnodes=2", "--rdzv-backend=static", "--master-addr=10.0.0.11",
            "--master-port=29601", "--nproc-per-node=1", "--max-restarts=0"} <= set(argv)
    assert not [a for a in argv if "c10d" in a or a.startswith("--rdzv-endpoint")]
    # one node, several GPUs: torchrun --standalone; one GPU or none: the trainer itself
    assert "--standalone" in trainer_argv("/py", o, 4) and "--nproc-per-node=4" in \
        trainer_argv("/py", o, 4)
    assert trainer_argv("/py", o, 1)[:3] == ["/py", "-m", "aifab.extension.trainer"]


def test_node_rank_hands_slurms_node_id_to_torchrun(tmp_path, monkeypatch):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "aifab.extension.node_rank", sys.executable,
                          "-c", "import os; print(os.environ['PET_NODE_RANK'])"],
                         env={"SLURM_NODEID": "1", "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stdout) == (0, "1\n"), out.stderr
    outside = subprocess.run([sys.executable, "-m", "aifab.extension.node_rank", "true"],
                             env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                             timeout=30)
    assert outside.returncode != 0 and "inside a Slurm step" in outside.stderr
