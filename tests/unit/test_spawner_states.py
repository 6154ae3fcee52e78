"""SlurmSessionSpawner's state machine in milliseconds, without Slurm.

batchspawner's ``run_spawner_script`` pattern: the command runner (aifab.slurm.arun) is
replaced by a script of what sbatch/squeue/scancel answer, and start/poll/stop/progress are
checked against it. tests/test_spawner_slurm.py checks the same against a real Slurm.
"""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import pytest
from batchspawner.batchspawner import JobStatus
from traitlets.config import Config

from aifab import slurm
from aifab.spawners import slurm as slurm_spawner
from aifab.spawners.options import Placement
from aifab.spawners.profiles import SlurmSettings
from aifab.spawners.slurm import SlurmConfigError, SlurmSessionSpawner

PLACEMENT = Placement("gpu", "slurm", gpus=2, cpus=4, memory_gb=8, walltime_s=1800)
SETTINGS = SlurmSettings(partition="gh200", gres_type="gh200")
TIMED_OUT = slurm.SlurmError(["squeue"], None, timeout=30)
GONE = slurm.SlurmError(["squeue"], 1, "", "slurm_load_jobs error: Invalid job id specified")
NO_CONTROLLER = slurm.SlurmError(
    ["squeue"], 1, "", "slurm_load_jobs error: Unable to contact slurm controller (connect "
                       "failure)")


class Script:
    """What the Slurm commands answer, in order: (command, stdout, a SlurmError or a function
    giving stdout). When the steps run out, ``then`` (if given) answers every further call."""

    def __init__(self, *steps, then=None):
        self.steps = list(steps)
        self.then = then
        self.calls: list[SimpleNamespace] = []

    async def __call__(self, argv, *, timeout, stdin=None, env=None, prefix=()):
        self.calls.append(SimpleNamespace(argv=list(argv), stdin=stdin, env=env,
                                          prefix=list(prefix), timeout=timeout))
        if self.steps:
            command, answer = self.steps.pop(0)
        elif self.then is not None:
            command, answer = self.then
        else:
            raise AssertionError(f"unexpected Slurm command {argv}")
        assert argv[0] == command, f"expected {command}, the spawner ran {argv}"
        if isinstance(answer, BaseException):
            raise answer
        return answer() if callable(answer) else answer

    def commands(self) -> list[str]:
        return [c.argv[0] for c in self.calls]


def make_spawner(script: Script, monkeypatch, config: Config | None = None, *,
                 shared_poll: bool = False, name: str = "ada"):
    """A spawner on a scripted Slurm; by default polling its own job (batchspawner's way,
    and the shared poller's fallback); tests/unit/test_slurm_poller.py checks the shared way."""
    monkeypatch.setattr(slurm_spawner.slurm, "arun", script)
    user = SimpleNamespace(name=name, url=f"/user/{name}/", escaped_name=name, admin=False,
                           groups=[], settings={}, id=1)
    sp = SlurmSessionSpawner(user=user, config=config or Config(), startup_poll_interval=0.001,
                             cmd=["jupyterhub-singleuser"], shared_poll=shared_poll,
                             shared_poll_gap=0.001)
    # what needs a hub or a Unix account: the job's environment, arguments and home
    sp.get_env = lambda: {"JUPYTERHUB_API_TOKEN": "tok", "PATH": "/usr/bin"}
    sp.get_args = lambda: ["--debug"]
    sp._homedir = lambda: f"/home/{name}"
    sp.placement, sp.slurm_settings = PLACEMENT, SETTINGS
    return sp


async def start_and_report_port(sp, port=50123, after=0.01):
    """start(), with the job reporting its port (through the hub API) a little later."""
    async def report():
        await asyncio.sleep(after)
        while not sp.job_id or sp.job_status.split()[:1] != ["RUNNING"]:
            await asyncio.sleep(0.001)
        sp.port = port
    reporter = asyncio.ensure_future(report())
    try:
        return await asyncio.wait_for(sp.start(), 5)
    finally:
        reporter.cancel()


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    monkeypatch.setattr(slurm_spawner, "STOP_WAIT_S", 0.2)
    monkeypatch.setattr(slurm_spawner, "PORT_CHECK_S", 0.01)


# ---------------------------------------------------------------- start
def test_start_submits_waits_in_the_queue_and_returns_the_node(monkeypatch):
    script = Script(("sbatch", "1234"), ("squeue", "PENDING Resources n/a"),
                    ("squeue", "PENDING Priority n/a"), ("squeue", "RUNNING None node7"),
                    then=("squeue", "RUNNING None node7"))
    sp = make_spawner(script, monkeypatch)
    assert asyncio.run(start_and_report_port(sp)) == ("node7", 50123)
    assert sp.job_id == "1234" and sp.get_state()["job_id"] == "1234"
    assert script.commands()[:4] == ["sbatch", "squeue", "squeue", "squeue"]
    sbatch = script.calls[0]
    assert sbatch.argv == ["sbatch", "--parsable"]
    assert sbatch.prefix == ["sudo", "-E", "-u", "ada"]  # as the user
    # the script comes on stdin; the token only in the environment, named by --export
    assert "#SBATCH --gres=gpu:gh200:2" in sbatch.stdin.splitlines()
    assert "#SBATCH --export=JUPYTERHUB_API_TOKEN,PATH" in sbatch.stdin.splitlines()
    assert "tok" not in sbatch.stdin and sbatch.env["JUPYTERHUB_API_TOKEN"] == "tok"
    assert sbatch.stdin.splitlines()[-1] == "exec aifab-singleuser jupyterhub-singleuser --debug"
    squeue = script.calls[1]
    assert squeue.argv == ["squeue", "-h", "-j", "1234", "-o", "%T %r %B"]
    assert squeue.env is None or "JUPYTERHUB_API_TOKEN" not in squeue.env
    assert all(c.timeout == sp.command_timeout for c in script.calls)


def test_sbatch_output_with_a_cluster_name_is_read(monkeypatch):
    script = Script(("sbatch", "Submitted\n77;alps"), then=("squeue", "RUNNING None nid001"))
    sp = make_spawner(script, monkeypatch)
    assert asyncio.run(start_and_report_port(sp)) == ("nid001", 50123)
    assert sp.job_id == "77"


@pytest.mark.parametrize("out", ["", "Submitted batch job", "12x;alps", "1 2", "-1"])
def test_sbatch_without_a_job_id_fails_the_start(monkeypatch, out):
    sp = make_spawner(Script(("sbatch", out)), monkeypatch)
    with pytest.raises(RuntimeError, match="sbatch printed no job id"):
        asyncio.run(sp.start())
    assert sp.job_id == ""


def test_sbatch_refused_is_a_slurm_error_with_its_message(monkeypatch):
    refused = slurm.SlurmError(["sbatch"], 1, "", "sbatch: error: invalid partition")
    sp = make_spawner(Script(("sbatch", refused)), monkeypatch)
    with pytest.raises(slurm.SlurmError, match="invalid partition"):
        asyncio.run(sp.start())


def test_a_squeue_timeout_is_unknown_and_start_keeps_waiting(monkeypatch):
    script = Script(("sbatch", "5"), ("squeue", TIMED_OUT), ("squeue", NO_CONTROLLER),
                    then=("squeue", "RUNNING None node1"))
    sp = make_spawner(script, monkeypatch)
    assert asyncio.run(start_and_report_port(sp)) == ("node1", 50123)
    assert "scancel" not in script.commands()


@pytest.mark.parametrize("answer", ["", GONE, "FAILED NonZeroExitCode node1",
                                    "CANCELLED None node1"])
def test_a_job_that_ends_in_the_queue_fails_the_start_and_is_forgotten(monkeypatch, answer):
    script = Script(("sbatch", "9"), ("squeue", "PENDING Resources n/a"), ("squeue", answer),
                    ("scancel", ""))
    sp = make_spawner(script, monkeypatch)
    with pytest.raises(RuntimeError, match="Slurm job 9 ended before the server started"):
        asyncio.run(sp.start())
    assert script.calls[-1].argv == ["scancel", "9"]
    assert sp.job_id == "" and sp.get_state() == {}


def test_a_job_that_ends_before_reporting_its_port_fails_the_start(monkeypatch):
    script = Script(("sbatch", "10"), ("squeue", "RUNNING None node2"), ("squeue", ""),
                    ("scancel", ""))
    sp = make_spawner(script, monkeypatch)
    with pytest.raises(RuntimeError, match="job 10 ended before its server reported a port"):
        asyncio.run(asyncio.wait_for(sp.start(), 5))
    assert script.commands() == ["sbatch", "squeue", "squeue", "scancel"]
    assert sp.job_id == ""


def test_an_unreadable_node_name_fails_the_start(monkeypatch):
    script = Script(("sbatch", "11"), ("squeue", "RUNNING None node;id"))
    sp = make_spawner(script, monkeypatch)
    with pytest.raises(RuntimeError, match="cannot read the job's node"):
        asyncio.run(sp.start())


def report_port(sp, port=8888) -> str:
    """squeue's answer once the job runs, its port reported in the same instant."""
    sp.port = port
    return "RUNNING None n1"


def test_start_polls_with_jitter_not_in_lock_step(monkeypatch):
    """Two spawners started together wait different times between their squeue calls."""
    waits = []
    real_sleep = asyncio.sleep

    async def sleep(dt, *args):
        waits.append(dt)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    for _ in range(2):
        script = Script(("sbatch", "1"), *[("squeue", "PENDING Resources n/a")] * 6)
        sp = make_spawner(script, monkeypatch)
        script.steps.append(("squeue", lambda sp=sp: report_port(sp)))
        asyncio.run(asyncio.wait_for(sp.start(), 5))
    assert len(waits) == 12  # 6 waits in the queue each, none for the port
    first, second = waits[:6], waits[6:]
    assert first != second and len(set(first)) == 6
    assert all(0 <= w <= 2.0 for w in waits)


# ---------------------------------------------------------------- poll
@pytest.mark.parametrize("answer, status, polled", [
    ("RUNNING None node7", JobStatus.RUNNING, None),
    ("COMPLETING None node7", JobStatus.RUNNING, None),
    ("PENDING Resources n/a", JobStatus.PENDING, None),
    ("CONFIGURING None node7", JobStatus.PENDING, None),
    (TIMED_OUT, JobStatus.UNKNOWN, None),
    (NO_CONTROLLER, JobStatus.UNKNOWN, None),
    (slurm.SlurmError(["squeue"], 127), JobStatus.UNKNOWN, None),
    ("", JobStatus.NOTFOUND, 1),
    (GONE, JobStatus.NOTFOUND, 1),
    ("COMPLETED None node7", JobStatus.NOTFOUND, 1),
])
def test_poll_reads_squeue(monkeypatch, answer, status, polled):
    sp = make_spawner(Script(("squeue", answer), ("squeue", answer)), monkeypatch)
    sp.load_state({"job_id": "42"})
    assert asyncio.run(sp.query_job_status()) == status
    assert asyncio.run(sp.poll()) == polled
    assert sp.job_id == ("" if polled else "42")  # a job found gone is forgotten


def test_poll_without_a_job_runs_nothing(monkeypatch):
    script = Script()
    sp = make_spawner(script, monkeypatch)
    assert asyncio.run(sp.poll()) == 1 and script.calls == []


# ---------------------------------------------------------------- stop
def test_stop_cancels_and_waits_until_the_job_has_left(monkeypatch):
    monkeypatch.setattr(slurm_spawner, "STOP_WAIT_S", 10)  # room for three jittered polls
    script = Script(("scancel", ""), ("squeue", "COMPLETING None node7"),
                    ("squeue", "RUNNING None node7"), ("squeue", GONE))
    sp = make_spawner(script, monkeypatch)
    sp.load_state({"job_id": "42"})
    asyncio.run(sp.stop())
    assert script.calls[0].argv == ["scancel", "42"]
    assert script.commands() == ["scancel", "squeue", "squeue", "squeue"]


def test_stop_now_only_cancels(monkeypatch):
    script = Script(("scancel", ""))
    sp = make_spawner(script, monkeypatch)
    sp.load_state({"job_id": "42"})
    asyncio.run(sp.stop(now=True))
    assert script.commands() == ["scancel"]


def test_stop_gives_up_waiting_with_a_warning(monkeypatch, caplog):
    script = Script(("scancel", ""), then=("squeue", "RUNNING None node7"))
    sp = make_spawner(script, monkeypatch)
    sp.load_state({"job_id": "42"})
    with caplog.at_level(logging.WARNING):
        asyncio.run(asyncio.wait_for(sp.stop(), 5))
    assert "still listed" in caplog.text
    assert script.commands().count("squeue") >= 2


def test_stop_without_a_job_runs_nothing(monkeypatch):
    script = Script()
    asyncio.run(make_spawner(script, monkeypatch).stop())
    assert script.calls == []


# ---------------------------------------------------------------- progress
def test_progress_says_why_the_job_waits_then_where_it_runs(monkeypatch):
    sp = make_spawner(Script(), monkeypatch)
    sp.job_id = "42"

    async def main():
        events = []
        gen = sp.progress().__aiter__()
        events.append(await gen.__anext__())
        for status in ("PENDING Resources n/a", "PENDING Priority n/a", "RUNNING None node7"):
            sp.job_status = status
            events.append(await asyncio.wait_for(gen.__anext__(), 2))
        with pytest.raises(StopAsyncIteration):
            await gen.__anext__()
        return events

    events = asyncio.run(main())
    assert [e["message"] for e in events] == [
        "Submitting to Slurm (gh200, 2 GPU(s), 00:30:00)",
        "Job 42 queued (Resources)",
        "Job 42 queued (Priority)",
        "Job 42 starting on node node7; waiting for the server",
    ]
    assert [e["progress"] for e in events] == [10, 30, 30, 60]


# ---------------------------------------------------------------- state
def test_state_round_trips_and_clears(monkeypatch):
    sp = make_spawner(Script(), monkeypatch)
    sp.load_state({"job_id": "42", "job_status": "RUNNING None node7"})
    assert sp.get_state() == {"job_id": "42", "job_status": "RUNNING None node7"}
    assert sp.state_isrunning() and sp.state_gethost() == "node7"
    sp.clear_state()
    assert sp.get_state() == {} and not sp.state_isrunning()


# ---------------------------------------------------------------- refused settings
@pytest.mark.parametrize("section, name, value, advice", [
    ("SlurmSpawner", "req_partition", "gpu", "slurm: {partition: ...}"),
    ("BatchSpawnerBase", "req_runtime", "1:00:00", "choices: {walltime: {default, max}}"),
    ("SlurmSessionSpawner", "batch_script", "#!/bin/sh", "the script is rendered"),
    ("Spawner", "exec_prefix", "sudo -u {username}", "SlurmSessionSpawner.submit_prefix"),
    ("SlurmSpawner", "batch_query_cmd", "squeue", "SlurmSessionSpawner.submit_prefix"),
    ("SlurmSpawner", "state_exechost_re", ".*", "remove it (aifab reads squeue"),
    ("SlurmSpawner", "req_srun", "", "remove it (the server runs as the batch step"),
    ("SlurmSpawner", "req_keepvars_extra", "X", "Spawner.env_keep"),
])
def test_a_batchspawner_setting_it_ignores_is_refused(monkeypatch, section, name, value,
                                                       advice):
    config = Config()
    config[section][name] = value
    with pytest.raises(SlurmConfigError) as exc:
        make_spawner(Script(), monkeypatch, config)
    assert f"c.{section}.{name} is set, but SlurmSessionSpawner does not use it" in str(exc.value)
    assert advice in str(exc.value)


def test_settings_it_honours_are_not_refused(monkeypatch):
    config = Config()
    config.SlurmSpawner.start_timeout = 600
    config.SlurmSessionSpawner.ip = "127.0.0.1"
    config.SlurmSessionSpawner.submit_prefix = []
    config.BatchSpawnerBase.batchspawner_singleuser_cmd = "/opt/bin/aifab-singleuser"
    config.Spawner.env_keep = ["PATH"]
    sp = make_spawner(Script(), monkeypatch, config)
    assert (sp.start_timeout, sp.ip, sp.submit_prefix) == (600, "127.0.0.1", [])
