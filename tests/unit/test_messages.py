"""Messages a newcomer reads: they say what is wrong, and nothing reads as an error that is
not one."""

from __future__ import annotations

import pytest

from aifab.extension.train_data import DataError, inspect_data
from aifab.magics.doctor import INFO, MISSING, check_slurm
from aifab.session import Session


def test_bad_json_names_the_line_and_column_once(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "ok"}\n{"text": "unterminated}')  # no newline at the end
    with pytest.raises(DataError) as err:
        inspect_data(data)
    assert str(err.value) == (f"{data}:2: not valid JSON: Unterminated string starting at "
                              "(column 10)")


def test_a_missing_file_says_which_folder_was_looked_in(tmp_path):
    with pytest.raises(DataError) as err:
        inspect_data(tmp_path / "missing.jsonl")
    assert str(err.value) == f"missing.jsonl: no such file or directory in {tmp_path}"


def test_no_slurm_is_information_for_a_session_that_does_not_use_it(tmp_path):
    env = {"PATH": str(tmp_path)}  # no sinfo here
    local = check_slurm(env, session=Session(backend="local"))
    assert local.status == INFO and local.hint == ""
    assert "not needed: this session runs on local" in local.detail
    on_slurm = check_slurm(env, session=Session(backend="slurm"))
    assert on_slurm.status == MISSING and "sinfo not found" in on_slurm.detail


def test_serve_list_shows_live_model_servers_and_their_adapters():
    from aifab.magics.serve_magic import list_lines

    rows = [
        {"name": "chat", "kind": "vllm", "status": "ready", "gpus": [], "served_name": "chat",
         "model": "/m/tiny", "loras": {"pong": "/runs/pong"}},
        {"name": "old", "kind": "vllm", "status": "stopped", "gpus": ["0"],
         "served_name": "old", "model": "/m/tiny", "loras": {}},
        {"name": "pong", "kind": "finetune", "status": "starting", "gpus": [],
         "served_name": "", "model": "/m/tiny", "loras": {}},
    ]
    assert list_lines(rows) == [
        "chat                 ready    cpu        model chat (/m/tiny) adapters: pong"]
    assert [line.split()[0] for line in list_lines(rows, show_all=True)] == ["chat", "old"]
    assert list_lines(rows[1:]) == [
        "no model servers running in this session (1 ended: %serve list --all)"]


def test_widget_polls_are_logged_at_debug_and_everything_else_as_before(caplog):
    import logging
    from types import SimpleNamespace

    from aifab.extension.handlers import ServicesHandler, quiet_polls

    def handler(cls, method, status):
        h = cls.__new__(cls)  # no server needed to decide where a log line goes
        h.request = SimpleNamespace(method=method, path="/aifab/api/services",
                                    request_time=lambda: 0.002)
        h._status_code = status
        return h

    seen = []
    log = logging.getLogger("test-quiet")
    quiet = quiet_polls(seen.append, log)
    with caplog.at_level(logging.DEBUG, logger="test-quiet"):
        quiet(handler(ServicesHandler, "GET", 200))
    assert seen == [] and caplog.records[0].levelno == logging.DEBUG
    assert caplog.records[0].getMessage() == "200 GET /aifab/api/services (2.0 ms)"
    for method, status in (("POST", 201), ("GET", 404)):
        quiet(handler(ServicesHandler, method, status))
    assert [(h.request.method, h._status_code) for h in seen] == [("POST", 201), ("GET", 404)]


def test_an_offline_session_refuses_a_model_it_does_not_have(tmp_path, monkeypatch):
    from aifab.models import offline_refusal

    cache = tmp_path / "cache"
    (cache / "tiny-llama").mkdir(parents=True)
    (cache / "tiny-llama" / "config.json").write_text("{}")
    (cache / "models--org--have").mkdir()
    monkeypatch.setenv("AIFAB_MODEL_CACHE", str(cache))
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    assert offline_refusal("org/have", env) == ""
    assert offline_refusal("org/does-not-exist", env) == (
        "model 'org/does-not-exist': offline session, and it is not in the shared model cache "
        "(it has: tiny-llama)")
    assert offline_refusal("org/does-not-exist", {"HF_HUB_CACHE": str(cache)}) == ""  # online
