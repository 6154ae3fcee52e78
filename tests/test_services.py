"""Session services in a real Jupyter server, without vLLM where vLLM adds nothing: the GPU
ledger, the authenticated proxy, failures, restarts and shutdown, with small real services
(the test kind ``tests.probe_kind``: http.server, a process tree), and the refusal of every
request that would bring its own program."""

from __future__ import annotations

import os
import signal

import pytest

from tests.harness.jupyter import JupyterServer, group_alive


@pytest.fixture
def server(tmp_path):
    srv = JupyterServer(tmp_path, env={"CUDA_VISIBLE_DEVICES": "0,1,2,3",
                                       "AIFAB_BACKEND": "slurm", "AIFAB_GPUS": "4"},
                        probe_kind=True)
    srv.start()
    yield srv
    srv.stop()


def create(server, name: str, gpus=None, behaviour="http", **fields):
    return server.request("POST", "aifab/api/services",
                          json={"kind": "probe", "name": name, "behaviour": behaviour,
                                "gpus": gpus, **fields})


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
    assert create(server, "pinned", "1,3", "gpus-to-file", out=str(out)).status_code == 201
    server.wait_service("pinned", "starting", 5)
    for _ in range(50):
        if out.exists() and out.read_text().strip():
            break
        import time

        time.sleep(0.1)
    assert out.read_text().strip() == "1,3"


@pytest.mark.parametrize("spec, status, message", [
    ({"kind": "probe", "name": "Bad Name"}, 400, "lowercase letters"),
    ({"kind": "shell", "name": "x"}, 400, "allowed are vllm, finetune, probe"),
    # no request brings its own program: the generic "command" kind is gone, and argv is
    # not a field of any kind
    ({"kind": "command", "name": "x", "argv": ["/bin/sh", "-c", "id"]}, 400,
     "kind 'command': allowed are vllm, finetune, probe"),
    ({"kind": "vllm", "name": "m", "model": "/no/such/model", "argv": ["id"]}, 400,
     "'argv': not a field of a vllm service"),
    ({"kind": "finetune", "name": "r", "model": "m", "data": "d", "argv": ["id"]}, 400,
     "'argv': not a field of a finetune service"),
    ({"kind": "probe", "name": "x", "gpus": 5}, 400,
     "5 GPU(s) requested but this session has 4"),
    ({"kind": "probe", "name": "x", "gpus": "7,8"}, 400,
     "GPU 7 is not one of this session's GPUs"),
    ({"kind": "vllm", "name": "m", "model": "/no/such/model"}, 400, "no such model directory"),
    ({"kind": "vllm", "name": "m", "model": "not a model"}, 400, "not a directory"),
    (["kind", "vllm"], 400, "expected a JSON object"),
    ("vllm", 400, "expected a JSON object"),
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
    assert create(server, "web", behaviour="echo-auth").status_code == 201
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
    first = JupyterServer(tmp_path, env=env, probe_kind=True)
    first.start()
    svc = create(first, "web", 1).json()
    first.wait_service("web", "ready", 20)
    first.crash()  # the server dies; its service lives on
    assert group_alive(svc["pid"])

    second = JupyterServer(tmp_path, env=env, probe_kind=True)
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
    svc = create(server, "tree", behaviour="tree").json()
    server.wait_service("tree", "starting", 5)
    assert group_alive(svc["pid"])
    r = server.request("DELETE", "aifab/api/services/tree")
    assert r.json()["status"] == "stopped"
    assert not group_alive(svc["pid"])


def test_gpu_numbers_are_positions_in_the_sessions_list(tmp_path):
    """Slurm may give a session GPUs 2,3: --gpus 0, (a list; a lone number is a count) means
    the session's first, i.e. GPU 2."""
    srv = JupyterServer(tmp_path, env={"CUDA_VISIBLE_DEVICES": "2,3"}, probe_kind=True)
    srv.start()
    try:
        assert create(srv, "first", "0,").json()["gpus"] == ["2"]
        r = create(srv, "again", "0,")
        assert r.status_code == 409 and "GPU 0 is held by 'first'" in r.json()["message"]
        assert create(srv, "second", "1,").json()["gpus"] == ["3"]
    finally:
        srv.stop()


def test_a_second_server_of_the_same_session_is_refused(server, tmp_path):
    twin = JupyterServer(server.root, env={"CUDA_VISIBLE_DEVICES": "0,1,2,3"},
                         probe_kind=True)
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


def test_a_bad_fine_tune_request_gets_the_same_message_over_rest_as_in_the_kernel(
        server, tmp_path, monkeypatch):
    """The server checks fine-tune options, whoever sends them: the REST answer and
    aifab.finetune()'s refusal are the same message."""
    from aifab.magics.finetuning import FineTuneError, finetune

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text('{"text": "ok"}\n')
    bad.write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    cases = [(good, {"lr": "fast"}, "lr='fast': expected a number"),
             (good, {"batch_size": 0}, "batch_size=0: an integer >= 1"),
             (good, {"method": "qlora"}, "method 'qlora': lora or full"),
             (bad, {}, f"{bad}:2: a record needs 'messages' (chat) or 'text'; it has: txt")]
    monkeypatch.setenv("AIFAB_SERVER_URL", server.url)
    monkeypatch.setenv("AIFAB_SERVER_TOKEN", server.token)
    for data, options, message in cases:
        body = {"kind": "finetune", "name": "run", "model": str(model), "data": str(data),
                **options}
        r = server.request("POST", "aifab/api/services", json=body)
        assert r.status_code == 400, r.text
        assert r.json()["message"] == message
        with pytest.raises(FineTuneError) as kernel:
            finetune(str(model), str(data), name="run", **options)
        assert str(kernel.value) == message
    assert server.get("aifab/api/services").json() == []
