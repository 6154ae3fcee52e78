"""Session services in a real Jupyter server, without vLLM where vLLM adds nothing: the GPU
ledger, the authenticated proxy, failures, restarts and shutdown, with small real services
(Python's http.server)."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from tests.harness.jupyter import JupyterServer, group_alive

HTTP_SERVER = [sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1"]


@pytest.fixture
def server(tmp_path):
    srv = JupyterServer(tmp_path, env={"CUDA_VISIBLE_DEVICES": "0,1,2,3",
                                       "AIFAB_BACKEND": "slurm", "AIFAB_GPUS": "4"})
    srv.start()
    yield srv
    srv.stop()


def create(server, name: str, gpus=None, argv=HTTP_SERVER):
    return server.request("POST", "aifab/api/services",
                          json={"kind": "command", "name": name, "argv": argv, "gpus": gpus})


def test_ledger_gives_disjoint_gpus_and_names_the_holders_when_full(server):
    a = create(server, "a", 2)
    b = create(server, "b", 2)
    assert a.status_code == b.status_code == 201, (a.text, b.text)
    assert a.json()["gpus"] == ["0", "1"] and b.json()["gpus"] == ["2", "3"]
    c = create(server, "c", 1)
    assert c.status_code == 409
    assert c.json()["message"] == ("1 GPU(s) requested but 0 free: GPU 0,1 held by 'a'; "
                                   "GPU 2,3 held by 'b'. Stop one of those services or ask "
                                   "for fewer GPUs")
    assert "c" not in [s["name"] for s in server.get("aifab/api/services").json()]
    session = server.get("aifab/api/session").json()
    assert session["gpus_held"] == {"a": ["0", "1"], "b": ["2", "3"]}

    server.request("DELETE", "aifab/api/services/a")
    d = create(server, "d", "0,1")
    assert d.status_code == 201 and d.json()["gpus"] == ["0", "1"]


def test_the_service_sees_exactly_its_gpus(server, tmp_path):
    out = tmp_path / "cvd.txt"
    argv = ["/bin/sh", "-c", f'echo "$CUDA_VISIBLE_DEVICES" > {out}; exec sleep 60']
    assert create(server, "pinned", "1,3", argv).status_code == 201
    server.wait_service("pinned", "starting", 5)
    for _ in range(50):
        if out.exists() and out.read_text().strip():
            break
        import time

        time.sleep(0.1)
    assert out.read_text().strip() == "1,3"


@pytest.mark.parametrize("spec, status, message", [
    ({"kind": "command", "name": "Bad Name", "argv": ["true"]}, 400, "lowercase letters"),
    ({"kind": "shell", "name": "x"}, 400, "allowed are vllm, command"),
    ({"kind": "command", "name": "x", "argv": ["true"], "gpus": 5}, 400,
     "5 GPU(s) requested but this session has 4"),
    ({"kind": "command", "name": "x", "argv": ["true"], "gpus": "7,8"}, 400,
     "GPU 7 is not one of this session's GPUs"),
    ({"kind": "vllm", "name": "m", "model": "/no/such/model"}, 400, "no such model directory"),
    ({"kind": "vllm", "name": "m", "model": "not a model"}, 400, "not a directory"),
    ({"kind": "command", "name": "x", "argv": "rm -rf /"}, 400, "argv: a non-empty list"),
])
def test_bad_requests_are_refused_before_anything_starts(server, spec, status, message):
    r = server.request("POST", "aifab/api/services", json=spec)
    assert r.status_code == status, r.text
    assert message in r.json()["message"]
    assert server.get("aifab/api/services").json() == []


def test_duplicate_name_is_refused(server):
    assert create(server, "web").status_code == 201
    r = create(server, "web")
    assert r.status_code == 409 and "already" in r.json()["message"]


def test_proxy_needs_jupyter_auth_and_adds_the_service_key(server):
    assert create(server, "web", argv=[sys.executable, "-c", ECHO_AUTH]).status_code == 201
    server.wait_service("web", "ready", 20)
    ok = server.get(f"aifab/proxy/web/anything?x=1&token={server.token}",
                    headers={"Cookie": "session=secret"})
    assert ok.status_code == 200
    key = ok.json()["authorization"]
    assert key.startswith("Bearer ") and len(key) > 20 and server.token not in key
    assert ok.json()["path"] == "/anything?x=1"  # Jupyter's token is not passed on
    assert ok.json()["cookie"] is None  # nor Jupyter's cookies
    assert server.get("aifab/proxy/web/anything", token=None).status_code == 403
    assert server.get("aifab/proxy/web/anything", token="wrong").status_code == 403
    assert server.get("aifab/proxy/nosuch/x").status_code == 404


ECHO_AUTH = """
import http.server, json, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"authorization": self.headers.get("Authorization"),
                           "cookie": self.headers.get("Cookie"), "path": self.path}).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
http.server.HTTPServer(("127.0.0.1", int(os.environ["AIFAB_SERVICE_PORT"])), H).serve_forever()
"""


def test_kill_9_marks_the_service_failed_and_frees_its_gpus(server):
    svc = create(server, "victim", 4).json()
    server.wait_service("victim", "ready", 20)
    os.kill(svc["pid"], signal.SIGKILL)
    failed = server.wait_service("victim", "failed", 10)
    assert failed["error"].startswith("exited (code -9)")
    assert server.get("aifab/api/session").json()["gpus_held"] == {}
    assert create(server, "next", 4).status_code == 201


def test_a_restarted_server_finds_its_services_and_shutdown_ends_them(tmp_path):
    env = {"CUDA_VISIBLE_DEVICES": "0,1"}
    first = JupyterServer(tmp_path, env=env)
    first.start()
    svc = create(first, "web", 1).json()
    first.wait_service("web", "ready", 20)
    first.crash()  # the server dies; its service lives on
    assert group_alive(svc["pid"])

    second = JupyterServer(tmp_path, env=env)
    second.start()
    try:
        found = second.get("aifab/api/services/web").json()
        assert (found["status"], found["pid"], found["gpus"]) == ("ready", svc["pid"], ["0"])
        assert second.get("aifab/proxy/web/").status_code == 200
        assert create(second, "other", 2).status_code == 409  # GPU 0 is still held
    finally:
        second.stop()  # the session ends: the whole group goes
    assert not group_alive(svc["pid"])


def test_delete_ends_the_whole_process_group(server):
    argv = ["/bin/sh", "-c", "sleep 300 & sleep 300 & wait"]
    svc = create(server, "tree", argv=argv).json()
    server.wait_service("tree", "starting", 5)
    assert group_alive(svc["pid"])
    r = server.request("DELETE", "aifab/api/services/tree")
    assert r.json()["status"] == "stopped"
    assert not group_alive(svc["pid"])


def test_gpu_numbers_are_positions_in_the_sessions_list(tmp_path):
    """Slurm may give a session GPUs 2,3: --gpus 0, (a list; a lone number is a count) means
    the session's first, i.e. GPU 2."""
    srv = JupyterServer(tmp_path, env={"CUDA_VISIBLE_DEVICES": "2,3"})
    srv.start()
    try:
        assert create(srv, "first", "0,").json()["gpus"] == ["2"]
        r = create(srv, "again", "0,")
        assert r.status_code == 409 and "GPU 0 is held by 'first'" in r.json()["message"]
        assert create(srv, "second", "1,").json()["gpus"] == ["3"]
    finally:
        srv.stop()


def test_a_second_server_of_the_same_session_is_refused(server, tmp_path):
    twin = JupyterServer(server.root, env={"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    twin.root = tmp_path  # its own log, the same state directory
    twin.log_path = tmp_path / "twin.log"
    twin.start()
    try:
        # Jupyter runs on without the extension; the first server keeps its services
        assert twin.get("aifab/api/services").status_code == 404
        assert "already manages its services" in twin.log_tail(200)
        assert server.get("aifab/api/services").status_code == 200
    finally:
        twin.stop()
