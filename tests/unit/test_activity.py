"""The session's own activity (aifab.extension.activity), without a server: a fake manager
whose run writes a metrics stream, and jupyter_server's rule for what counts."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from aifab.api import Status
from aifab.extension.activity import LAST_ACTIVITY_KEY, SETTINGS_KEY, Activity, install


@dataclass
class Record:
    kind: str
    status: str | Status
    output: str = ""


class Manager:
    def __init__(self, **services: Record):
        self.services = dict(services)


def step(out: Path, n: int) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"event": "step", "step": n, "loss": 1.0 / n}) + "\n")


@pytest.fixture
def run_dir(tmp_path) -> Path:
    out = tmp_path / "run"
    out.mkdir()
    return out


def test_a_stepping_run_touches_and_a_quiet_one_does_not(run_dir):
    settings: dict = {}
    activity = Activity(settings, Manager(pp=Record("finetune", "starting", str(run_dir))))
    step(run_dir, 1)
    assert not activity.check()  # the first look notes where the stream is
    assert LAST_ACTIVITY_KEY not in settings
    assert not activity.check()  # nothing new
    step(run_dir, 2)
    assert activity.check()
    first = settings[LAST_ACTIVITY_KEY]
    assert first.tzinfo is not None and first.utcoffset() == timedelta(0)
    assert abs(datetime.now(timezone.utc) - first) < timedelta(seconds=5)
    assert not activity.check()  # once per growth
    assert settings[LAST_ACTIVITY_KEY] == first
    step(run_dir, 3)
    assert activity.check()
    assert settings[LAST_ACTIVITY_KEY] >= first


def test_a_stream_that_appears_counts(run_dir):
    activity = Activity({}, Manager(pp=Record("finetune", Status.STARTING, str(run_dir))))
    assert not activity.check()  # still loading the model: no metrics.jsonl yet
    assert not activity.check()
    step(run_dir, 1)
    assert activity.check()


def test_same_size_rewrite_counts_by_mtime(run_dir):
    activity = Activity({}, Manager(pp=Record("finetune", "ready", str(run_dir))))
    (run_dir / "metrics.jsonl").write_text("x\n")
    os.utime(run_dir / "metrics.jsonl", ns=(1, 1))
    activity.check()
    (run_dir / "metrics.jsonl").write_text("y\n")
    assert activity.check()


@pytest.mark.parametrize("record", [
    Record("vllm", "ready", ""),  # an idle vLLM: running is not working
    Record("command", "ready", ""),
    Record("finetune", "finished", "{out}"),  # ended: its files may still change (cleanup)
    Record("finetune", "failed", "{out}"),
    Record("finetune", Status.STOPPING, "{out}"),  # being stopped: it checkpoints, not works
])
def test_what_does_not_count(run_dir, record):
    record.output = record.output.replace("{out}", str(run_dir))
    settings: dict = {}
    activity = Activity(settings, Manager(svc=record))
    for n in range(1, 4):
        step(run_dir, n)
        assert not activity.check()
    assert LAST_ACTIVITY_KEY not in settings


def test_an_idle_vllm_next_to_a_stepping_run_changes_nothing(run_dir, tmp_path):
    settings: dict = {}
    manager = Manager(llm=Record("vllm", "ready"), pp=Record("finetune", "ready", str(run_dir)))
    activity = Activity(settings, manager)
    activity.check()
    assert activity.stepping_runs() == []
    step(run_dir, 1)
    assert activity.stepping_runs() == ["pp"]


def test_a_run_that_ended_and_restarted_starts_from_a_new_baseline(run_dir, tmp_path):
    manager = Manager(pp=Record("finetune", "starting", str(run_dir)))
    activity = Activity({}, manager)
    step(run_dir, 1)
    activity.check()
    manager.services["pp"].status = "finished"
    activity.check()  # forgotten
    step(run_dir, 2)
    manager.services["pp"].status = "starting"  # --resume, same name, same output
    assert not activity.check()  # a first look again
    step(run_dir, 3)
    assert activity.check()
    other = tmp_path / "other"
    other.mkdir()
    step(other, 1)
    manager.services["pp"].output = str(other)  # same name, another output: a new baseline
    assert not activity.check()


def test_touch_is_what_jupyter_server_counts(run_dir):
    """ServerWebApplication.last_activity() takes the max over its sources and every setting
    ending in _last_activity: ours must compare with its own timestamps."""
    from jupyter_server._tz import utcnow

    settings: dict = {"started": utcnow()}
    activity = Activity(settings, Manager())
    activity.touch()
    keys = [k for k in settings if k.endswith("_last_activity")]
    assert keys == [LAST_ACTIVITY_KEY]
    assert max([settings["started"], *(settings[k] for k in keys)]) == activity.last
    assert SETTINGS_KEY not in keys


def test_the_periodic_look_touches_while_a_run_steps(run_dir):
    settings: dict = {}
    manager = Manager(pp=Record("finetune", "starting", str(run_dir)))

    async def scenario():
        activity = Activity(settings, manager, interval=0.05)
        activity.start()
        try:
            await asyncio.sleep(0.2)
            assert LAST_ACTIVITY_KEY not in settings  # running, not stepping
            step(run_dir, 1)
            for _ in range(100):
                if LAST_ACTIVITY_KEY in settings:
                    break
                await asyncio.sleep(0.02)
            assert LAST_ACTIVITY_KEY in settings
            manager.services["broken"] = object()  # a bad record: logged, the watch goes on
            task = activity._task
            await asyncio.sleep(0.2)
            assert not task.done()
        finally:
            activity.stop()
        await asyncio.sleep(0)
        assert task.cancelled() or task.done()

    asyncio.run(scenario())


def test_install_writes_the_servers_settings_not_the_extensions_copy():
    class WebApp:
        settings: dict = {}

    class ServerApp:
        web_app = WebApp()

    class Ext:
        serverapp = ServerApp()
        settings: dict = {}
        log = None

    activity = install(Ext(), Manager())
    assert Ext.settings[SETTINGS_KEY] is activity
    activity.touch()
    assert LAST_ACTIVITY_KEY in WebApp.settings and LAST_ACTIVITY_KEY not in Ext.settings
