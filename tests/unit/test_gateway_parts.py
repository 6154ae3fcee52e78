"""The models gateway's pure parts: model ids, groups, limits (429 and Retry-After), the
registry on disk, the usage log, the hub config it writes and the router's command line."""

from __future__ import annotations

import json
import stat
from datetime import datetime

import pytest
from traitlets.config import Config

from aifab.gateway import SCOPE_PUBLISH, SCOPE_USE, add_models_service
from aifab.gateway.limits import Limit, Limiter, LimitError, parse_limits
from aifab.gateway.registry import Publication, Registry, check_groups, parse_model_id
from aifab.gateway.routers import router_argv
from aifab.gateway.usage import UsageLog
from aifab.hub_urls import models_url


@pytest.mark.parametrize("value", ["teacher/chat", "a.b@x+y-z/m-1", "T0/x"])
def test_model_ids_that_are_published_names(value):
    owner, name = parse_model_id(value)
    assert f"{owner}/{name}" == value


@pytest.mark.parametrize("value", [
    "teacher", "teacher/../chat", "teacher/chat/../../admin", "/chat", "teacher/Chat",
    "teacher/chat\n", "../x/y", "teacher/-x", "", None, 3, ["teacher/chat"], "a" * 70 + "/x"])
def test_model_ids_with_path_characters_or_wrong_types_are_refused_with_the_rule(value):
    with pytest.raises(ValueError, match="OWNER/NAME"):
        parse_model_id(value)


def test_groups_are_checked_and_sorted_once_each():
    assert check_groups(["class", "staff", "class"]) == ["class", "staff"]
    for bad in ([], "class", ["a b"], ["../x"], [3], None):
        with pytest.raises(ValueError, match="group"):
            check_groups(bad)


def test_limits_default_and_the_most_generous_group_wins():
    default, groups = parse_limits({"default": {"concurrency": 2},
                                    "groups": {"a": {"concurrency": 5},
                                               "b": {"tokens_per_minute": 10}}})
    assert default == Limit(2, 100_000)
    limiter = Limiter(default, groups)
    assert limiter.limit_for([]) == default
    assert limiter.limit_for(["a", "b", "other"]) == Limit(5, 100_000)


@pytest.mark.parametrize("config", [
    [], {"defaults": {}}, {"default": {"concurrency": 0}}, {"default": {"concurrency": "2"}},
    {"default": {"concurency": 2}}, {"groups": {"a": {"concurrency": True}}}])
def test_bad_limits_are_refused_with_what_is_allowed(config):
    with pytest.raises(ValueError, match="limits"):
        parse_limits(config)


def test_concurrency_limit_then_release():
    limiter = Limiter(Limit(2, 1000))
    limiter.acquire("alice", [])
    limiter.acquire("alice", [])
    with pytest.raises(LimitError) as exc:
        limiter.acquire("alice", [])
    assert exc.value.retry_after == 1 and "limit is 2" in str(exc.value)
    limiter.acquire("bob", [])  # another caller is not held back
    limiter.release("alice", 0)
    limiter.acquire("alice", [])


def test_tokens_per_minute_says_when_enough_tokens_age_out(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("aifab.gateway.limits.time.monotonic", lambda: now[0])
    limiter = Limiter(Limit(10, 100))
    limiter.acquire("alice", [])
    limiter.release("alice", 60)
    now[0] += 20
    limiter.acquire("alice", [])
    limiter.release("alice", 60)  # 120 in the window: over
    with pytest.raises(LimitError) as exc:
        limiter.acquire("alice", [])
    assert exc.value.retry_after == 40  # the first 60 leave the window 60 s after they came
    now[0] += 40
    limiter.acquire("alice", [])  # 60 left: under the limit again


def _pub(**kw) -> Publication:
    return Publication(**{"owner": "teacher", "name": "chat", "served_name": "tiny",
                          "upstreams": ["http://127.0.0.1:1/user/teacher/aifab/published/chat"],
                          "key": "k" * 43, "groups": ["class"], **kw})


def test_the_registry_survives_a_restart_and_is_private(tmp_path):
    reg = Registry(tmp_path)
    reg.put(_pub())
    reg.put(_pub(name="other", labels={"slurm.job": "12"}))
    assert stat.S_IMODE((tmp_path / "registry.json").stat().st_mode) == 0o600
    again = Registry(tmp_path)
    assert sorted(again.models) == ["teacher/chat", "teacher/other"]
    assert again.get("teacher/other").labels == {"slurm.job": "12"}
    assert again.remove("teacher/chat").name == "chat"
    assert sorted(Registry(tmp_path).models) == ["teacher/other"]
    public = again.get("teacher/other").public({"http://x": True})
    assert "key" not in public and public["id"] == "teacher/other"
    assert public["health"] == {"http://x": True}


def test_the_usage_log_gives_an_owner_the_lines_of_their_models(tmp_path):
    log = UsageLog(tmp_path)
    for model, caller in (("teacher/chat", "alice"), ("other/x", "bob"),
                          ("teacher/chat", "carol")):
        log.record(caller=caller, model=model, prompt_tokens=3, completion_tokens=5,
                   status=200, latency_ms=12.34, stream=False)
    lines = log.lines_for({"teacher/chat"})
    assert [x["caller"] for x in lines] == ["alice", "carol"]
    assert lines[0]["prompt_tokens"] == 3 and lines[0]["completion_tokens"] == 5
    assert stat.S_IMODE((tmp_path / "usage.jsonl").stat().st_mode) == 0o600
    log.close()


def test_the_hub_config_in_one_call_keeps_what_the_site_set(tmp_path):
    c = Config()
    c.JupyterHub.load_roles = [{"name": "user", "scopes": ["self", "read:groups"]}]
    c.JupyterHub.services = [{"name": "other", "url": "http://127.0.0.1:9"}]
    c.Spawner.server_token_scopes = ["read:users:name!user"]
    add_models_service(c, state_dir=str(tmp_path), port=8999,
                       limits={"groups": {"class": {"concurrency": 2}}})
    assert set(c.JupyterHub.custom_scopes) == {SCOPE_USE, SCOPE_PUBLISH}
    names = [s["name"] for s in c.JupyterHub.services]
    assert names == ["other", "aifab-models"]
    svc = c.JupyterHub.services[1]
    assert svc["url"] == "http://127.0.0.1:8999"
    assert svc["command"][1:] == ["-m", "aifab.gateway"]
    assert json.loads(svc["environment"]["AIFAB_MODELS_LIMITS"])["groups"]["class"] == {
        "concurrency": 2}
    user = next(r for r in c.JupyterHub.load_roles if r["name"] == "user")
    assert user["scopes"] == ["self", "read:groups", f"{SCOPE_PUBLISH}!user",
                              "access:services!service=aifab-models"]
    assert {"read:users:name!user", SCOPE_USE, f"{SCOPE_PUBLISH}!user",
            "access:servers!server"} <= set(c.Spawner.server_token_scopes)
    add_models_service(c, state_dir=str(tmp_path))  # twice: still one service, one grant
    assert [s["name"] for s in c.JupyterHub.services].count("aifab-models") == 1
    assert user["scopes"].count(f"{SCOPE_PUBLISH}!user") == 1


def test_bad_limits_stop_the_hub_config():
    with pytest.raises(ValueError, match="limits"):
        add_models_service(Config(), state_dir="/tmp/x", limits={"default": {"x": 1}})


def test_the_router_listens_on_loopback_with_health_checks_and_no_key():
    argv = router_argv(30001, 30002, 2)
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--prometheus-host") + 1] == "127.0.0.1"
    assert argv[argv.index("--health-check-interval-secs") + 1] == "2"
    assert "--api-key" not in argv


def test_the_models_url_from_a_session():
    assert models_url({"AIFAB_MODELS_URL": "https://h/services/aifab-models"}) == \
        "https://h/services/aifab-models/"
    assert models_url({"JUPYTERHUB_PUBLIC_URL": "https://hub.example.org/jh/user/ada/",
                       "JUPYTERHUB_BASE_URL": "/jh/"}) == \
        "https://hub.example.org/jh/services/aifab-models/"
    assert models_url({"JUPYTERHUB_PUBLIC_URL": "http://127.0.0.1:8000/user/ada/"}) == \
        "http://127.0.0.1:8000/services/aifab-models/"
    with pytest.raises(ValueError, match="AIFAB_MODELS_URL"):
        models_url({})


def test_the_magics_load_and_serve_parses_share_and_unshare():
    from IPython.core.error import UsageError
    from IPython.core.interactiveshell import InteractiveShell

    from aifab.magics.serve_magic import parse_serve

    shell = InteractiveShell.instance()
    try:
        shell.run_line_magic("load_ext", "aifab.magics")
        assert {"serve", "finetune", "dask"} <= set(shell.magics_manager.magics["line"])
    finally:
        InteractiveShell.clear_instance()
    assert parse_serve("tiny --share class,staff")[1].share == ["class", "staff"]
    command, opts, _ = parse_serve("share chat class")
    assert (command, opts.name, opts.groups) == ("share", "chat", ["class"])
    assert parse_serve("unshare chat")[:2][0] == "unshare"
    for bad in ("share chat", "share chat ,", "stop chat --all", "tiny --share"):
        with pytest.raises(UsageError):
            parse_serve(bad)


def test_a_signature_is_good_for_its_route_and_a_minute_only():
    from aifab import signing

    key = "k" * 43
    header = signing.sign(key, "/v1/chat/completions", now=1000)
    assert signing.verify(key, "/v1/chat/completions", header, now=1030)
    assert not signing.verify(key, "/v1/completions", header, now=1030)  # another route
    assert not signing.verify(key, "/v1/chat/completions", header, now=1061)  # too old
    assert not signing.verify("x" * 43, "/v1/chat/completions", header, now=1000)
    for bad in ("", "Bearer " + key, "Bearer aifab1.x.y", "Bearer aifab1.1000", header + "0"):
        assert not signing.verify(key, "/v1/chat/completions", bad, now=1000)


def test_a_deployment_request_is_checked_with_what_is_allowed(tmp_path):
    from aifab.gateway.deployments import DeployError, DeploySettings, check_request

    settings = DeploySettings(max_replicas=3, max_days=2)
    now = 1_800_000_000.0
    soon = datetime.fromtimestamp(now + 3600).isoformat(timespec="minutes")
    good = check_request({"model": str(tmp_path), "replicas": 2, "until": soon}, settings, now)
    assert good["replicas"] == 2 and good["gpus"] == 0 and good["until"] > now
    for body, words in [
        ({"model": "org/name", "until": soon}, "absolute path"),
        ({"model": str(tmp_path / "missing"), "until": soon}, "model folder"),
        ({"model": str(tmp_path), "until": soon, "replicas": 0}, "1 to 3"),
        ({"model": str(tmp_path), "until": soon, "replicas": True}, "1 to 3"),
        ({"model": str(tmp_path), "until": soon, "gpus": -1}, "gpus"),
        ({"model": str(tmp_path), "until": "tomorrow"}, "ISO time"),
        ({"model": str(tmp_path), "until": None}, "ISO time"),
        ({"model": str(tmp_path), "until": datetime.fromtimestamp(now - 10).isoformat()},
         "not in the future"),
        ({"model": str(tmp_path), "until": datetime.fromtimestamp(now + 3 * 86400)
          .isoformat()}, "2 days"),
    ]:
        with pytest.raises(DeployError, match=words):
            check_request(body, settings, now)


def test_a_replica_job_runs_as_its_owner_with_the_walltime_and_no_shell_string(tmp_path):
    from aifab.gateway.deployments import Deployer, DeploySettings
    from aifab.gateway.registry import Publication

    settings = DeploySettings.from_json(json.dumps({"partition": "gh200"}))
    deployer = Deployer(settings, registry=None, python="/venv/bin/python")
    pub = Publication(owner="ada", name="chat", served_name="chat", upstreams=[], key="k",
                      groups=["class"], deployment={"model": "/models/my model; rm -rf /",
                                                    "gpus": 1, "max_model_len": 0})
    script = deployer.script(pub, tmp_path, 90, {"node7"})
    assert "#SBATCH --time=90" in script and "#SBATCH --partition=gh200" in script
    assert "#SBATCH --gpus=1" in script and "#SBATCH --exclude=node7\n" in script
    assert "#SBATCH --no-requeue" in script
    assert "--exclude" not in deployer.script(pub, tmp_path, 90)
    assert "'/models/my model; rm -rf /'" in script  # one argument, quoted
    assert deployer._prefix("ada") == ["sudo", "-E", "-u", "ada"]
    with pytest.raises(ValueError, match="unknown keys"):
        DeploySettings.from_json('{"partitions": "x"}')
    with pytest.raises(ValueError, match="Slurm name"):
        DeploySettings.from_json('{"partition": "a b"}')


def test_the_gateway_reads_only_regular_files_of_the_owner_and_only_their_tail(tmp_path):
    import os

    from aifab.gateway.deployments import read_owned

    uid = os.getuid()
    log = tmp_path / "replica-1.log"
    log.write_text("x" * 1000 + "last line\n")
    assert read_owned(log, uid, cap=20).endswith("last line\n")
    assert len(read_owned(log, uid, cap=20)) == 20
    secret = tmp_path / "secret"
    secret.write_text("not for the owner")
    (tmp_path / "replica-2.log").symlink_to(secret)
    os.mkfifo(tmp_path / "replica-3.log")
    for name in ("replica-2.log", "replica-3.log"):  # a link, a FIFO (which would block)
        with pytest.raises(OSError):
            read_owned(tmp_path / name, uid)
    with pytest.raises(OSError, match="owner"):
        read_owned(log, uid + 1)  # someone else's file


def test_the_deployments_folder_and_key_are_made_fresh_never_through_a_link(tmp_path):
    import asyncio
    import getpass
    import sys

    from aifab.gateway.deployments import Deployer, DeploySettings

    settings = DeploySettings(dir=str(tmp_path / "{owner}"), min_uid=0)
    deployer = Deployer(settings, registry=None, python=sys.executable)
    owner = getpass.getuser()
    folder = tmp_path / owner / "chat"
    folder.mkdir(parents=True)
    target = tmp_path / "elsewhere"
    target.write_text("untouched")
    (folder / "key").symlink_to(target)  # planted by the owner
    made, key = asyncio.run(deployer._prepare(owner, "chat"))
    assert made == folder and (folder / "key").read_text() == key
    assert not (folder / "key").is_symlink() and target.read_text() == "untouched"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "key").stat().st_mode) == 0o600
