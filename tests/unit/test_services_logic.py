"""The session services' logic without a Jupyter server: the ledger, the request types, the
kinds' pure parts (vLLM's phases, a run's outcome), and the manager's state machine over a
real short-lived process (no vLLM, no Slurm, no root)."""

from __future__ import annotations

import asyncio
import json
import logging
import sys

import pytest

from aifab import supervisor
from aifab.api import BadRequest, Conflict, FineTuneOptions, NotFound, Status
from aifab.extension.kinds.base import LaunchPlan, ServiceKind, base_env
from aifab.extension.kinds.finetune import run_outcome, trainer_argv
from aifab.extension.kinds.vllm import phase_from_log, vllm_argv
from aifab.extension.ledger import GPURequestError, GPUsBusy, allocate
from aifab.extension.services import ServiceManager
from aifab.session import Session

VISIBLE = ("0", "1", "2", "3")


# ------------------------------------------------------------------ the ledger
def test_ledger_hands_out_free_gpus_in_order_and_names_holders_when_full():
    assert allocate(2, VISIBLE, {}) == ["0", "1"]
    assert allocate("2", VISIBLE, {"a": ["0", "1"]}) == ["2", "3"]
    with pytest.raises(GPUsBusy) as busy:
        allocate(1, VISIBLE, {"a": ["0", "1"], "b": ["2", "3"]})
    assert busy.value.http_status == 409
    assert str(busy.value) == ("1 GPU(s) requested but 0 free: GPU 0,1 held by 'a'; GPU 2,3 "
                               "held by 'b'. Stop one of those services or ask for fewer GPUs")


@pytest.mark.parametrize("spec, held, message, status", [
    (5, {}, "5 GPU(s) requested but this session has 4", 400),
    ("7,8", {}, "GPU 7 is not one of this session's GPUs", 400),
    ("0,0", {}, "names a GPU twice", 400),
    ("all", {"a": ["1"]}, "gpus=all but some are in use", 409),
    ("1,", {"a": ["1"]}, "GPU 1 is held by 'a'", 409),
    (True, {}, "give a count", 400),
    ("two", {}, "give a count (2)", 400),
])
def test_ledger_refusals_carry_their_http_status(spec, held, message, status):
    with pytest.raises(GPURequestError) as err:
        allocate(spec, VISIBLE, held)
    assert message in str(err.value) and err.value.http_status == status


def test_gpu_numbers_are_positions_and_uuids_are_names():
    assert allocate("0,", ("2", "3"), {}) == ["2"]
    assert allocate("GPU-abc", ("GPU-abc", "GPU-def"), {}) == ["GPU-abc"]
    assert allocate("all", ("2", "3"), {}) == ["2", "3"]
    assert allocate(0, (), {}) == []


# ------------------------------------------------------------------ request types
def test_status_is_a_string_on_the_wire_and_in_sets():
    assert json.dumps({"s": Status.READY}) == '{"s": "ready"}'
    assert "failed" in {Status.FAILED} and f"{Status.STOPPED}" == "stopped"
    assert Status.STOPPING.live and not Status.STOPPING.running and not Status.FAILED.live


def test_fine_tune_options_convert_numbers_and_refuse_unknown_fields():
    opts = FineTuneOptions.from_request({"kind": "finetune", "model": "m", "data": "d",
                                         "lr": "2e-4", "max_steps": "10", "epochs": 2})
    assert (opts.lr, opts.max_steps, opts.epochs) == (2e-4, 10, 2.0)
    with pytest.raises(BadRequest, match="unknown fine-tune option.*argv"):
        FineTuneOptions.from_request({"model": "m", "data": "d", "argv": ["id"]})
    with pytest.raises(BadRequest, match=r"max_steps='1\.5': expected an integer"):
        FineTuneOptions.from_request({"model": "m", "data": "d", "max_steps": "1.5"})
    with pytest.raises(BadRequest, match="packing='yes': true or false"):
        FineTuneOptions.from_request({"model": "m", "data": "d", "packing": "yes"})
    with pytest.raises(BadRequest, match="data: required"):
        FineTuneOptions.from_request({"model": "m"})


# ------------------------------------------------------------------ kinds' pure parts
def test_vllm_phases_follow_its_log_and_never_go_back():
    assert phase_from_log([]) == "starting"
    log = ["INFO Starting to load model /m", "INFO # CPU blocks: 100", "INFO Loading weights"]
    assert phase_from_log(log) == "KV cache"
    assert phase_from_log(log + ["INFO Application startup complete."]) == "starting server"


def test_vllm_command_line_keeps_the_key_off_it_and_listens_on_the_socket():
    argv = vllm_argv("/py", "/m", socket_path="/run/x/vllm.sock", served_name="m",
                     tensor_parallel=2, cpu=False, loras={"a": "/ad"})
    assert argv[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--uds") + 1] == "/run/x/vllm.sock"
    assert "--api-key" not in argv and "--host" not in argv and "--port" not in argv
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert argv[argv.index("--lora-modules") + 1] == "a=/ad"


def test_trainer_command_line_is_built_from_checked_options():
    o = FineTuneOptions(model="/m", data="/d.jsonl", name="run", output="/o", max_steps=5)
    one = trainer_argv("/py", o, 1)
    assert one[:3] == ["/py", "-m", "aifab.extension.trainer"]
    assert one[one.index("--max-steps") + 1] == "5" and "--resume" not in one
    four = trainer_argv("/py", o, 4)
    assert four[:3] == ["/py", "-m", "torch.distributed.run"]
    assert "--nproc-per-node=4" in four


def test_run_outcome_reads_what_the_run_wrote(tmp_path):
    assert run_outcome("") is None
    assert run_outcome(str(tmp_path)) is None  # nothing written yet: the exit code decides
    (tmp_path / "metrics.jsonl").write_text(
        '{"event": "step"}\n{"event": "interrupted", "reason": "SIGTERM"}\n')
    status, error = run_outcome(str(tmp_path))
    assert status == Status.FAILED and "continue with --resume" in error
    (tmp_path / "aifab-run.json").write_text("{}")
    assert run_outcome(str(tmp_path)) == (Status.FINISHED, "")


def test_base_env_drops_a_launchers_ranks():
    env = base_env({"RANK": "3", "MASTER_ADDR": "x", "HOME": "/h"}, ["1", "2"])
    assert env == {"HOME": "/h", "CUDA_VISIBLE_DEVICES": "1,2", "PYTHONUNBUFFERED": "1"}


# ------------------------------------------------------------------ the manager
class SleeperKind(ServiceKind):
    """A kind whose process sleeps and never becomes ready (or exits at once)."""

    name = "sleeper"
    fields = ("seconds", "code")

    def validate(self, spec):
        self.check_fields(spec)
        return spec

    def default_gpus(self, request):
        return request.get("gpus")

    def plan(self, request, *, name, gpus, service_dir, api_key):
        code = int(request.get("code", 0))
        script = f"import time, sys; time.sleep({float(request.get('seconds', 60))}); " \
                 f"sys.exit({code})"
        return LaunchPlan(argv=[sys.executable, "-c", script],
                          env=base_env({"PATH": "/usr/bin:/bin"}, gpus))

    async def ready(self, svc):
        return False


@pytest.fixture
def manager(tmp_path):
    session = Session(backend="slurm", gpu_count=4, visible_gpus=VISIBLE)
    m = ServiceManager(tmp_path / "state", session, logging.getLogger("test"),
                       stop_grace=2, ready_timeout=0.5, kinds={"sleeper": SleeperKind})
    yield m
    asyncio.run(m.stop_all())


def test_a_service_not_ready_in_time_is_killed_and_marked_failed(manager):
    svc = manager.create({"kind": "sleeper", "name": "slow", "gpus": 2})
    assert svc.status == Status.STARTING and svc.gpus == ["0", "1"]
    assert supervisor.is_same(svc.pid, svc.started)

    async def watch():
        await asyncio.sleep(0.6)
        await manager.check(svc)

    asyncio.run(watch())
    assert svc.status == Status.FAILED and svc.error == "not ready after 0s"
    assert not supervisor.group_alive(svc.pid)
    assert manager.held() == {}  # its GPUs are free again
    record = json.loads((manager.state_dir / "slow" / "record.json").read_text())
    assert record["status"] == "failed" and "api_key" in record


def test_an_exit_is_seen_with_its_code_and_last_log_line(manager):
    svc = manager.create({"kind": "sleeper", "name": "quick", "seconds": 0, "code": 3})
    manager._procs["quick"].wait(10)
    asyncio.run(manager.check(svc))
    assert svc.status == Status.FAILED and svc.exit_code == 3
    assert svc.error.startswith("exited (code 3)")


def test_names_conflicts_and_unknown_services(manager):
    manager.create({"kind": "sleeper", "name": "one"})
    with pytest.raises(Conflict, match="already starting"):
        manager.create({"kind": "sleeper", "name": "one"})
    with pytest.raises(BadRequest, match="kind 'command': allowed are vllm, finetune, sleeper"):
        manager.create({"kind": "command", "name": "x", "argv": ["id"]})
    with pytest.raises(BadRequest, match="'argv': not a field of a sleeper service"):
        manager.create({"kind": "sleeper", "name": "x", "argv": ["id"]})
    with pytest.raises(BadRequest, match="expected a JSON object"):
        manager.create(["kind", "sleeper"])
    with pytest.raises(NotFound, match=r"no service named 'two' \(services: one\)"):
        manager.get("two")
    stopped = asyncio.run(manager.stop("one"))
    assert stopped.status == Status.STOPPED and not supervisor.group_alive(stopped.pid)


def test_a_new_manager_adopts_a_live_service_and_fails_a_dead_one(tmp_path, manager):
    live = manager.create({"kind": "sleeper", "name": "live"})
    manager.create({"kind": "sleeper", "name": "dead", "seconds": 0})
    manager._procs["dead"].wait(10)
    manager._lock.close()  # the first server is gone (its lock with it)
    second = ServiceManager(manager.state_dir, manager.session, logging.getLogger("t2"),
                            kinds={"sleeper": SleeperKind})
    second.adopt()
    assert second.get("live").status == Status.STARTING and second.get("live").pid == live.pid
    assert second.get("dead").status == Status.FAILED
    assert second.get("dead").error == "exited while the Jupyter server was down"
    asyncio.run(second.stop_all())


def test_a_one_shot_service_may_leave_its_name_to_the_kind(manager):
    class Named(SleeperKind):
        name, one_shot = "named", True

        def validate(self, spec):
            return type("R", (), {**spec, "name": spec.get("name") or "made-up"})()

        def default_gpus(self, request):
            return 0

        def plan(self, request, **kw):
            return super().plan({"seconds": 0}, **kw)

    manager.kinds["named"] = Named(manager.kinds["sleeper"].ctx)
    for name in (None, ""):
        svc = manager.create({"kind": "named", "name": name})
        assert svc.name == "made-up"
        manager._procs["made-up"].wait(10)
        asyncio.run(manager.check(svc))
    with pytest.raises(BadRequest, match="name ''"):
        manager.create({"kind": "sleeper", "name": ""})
    with pytest.raises(BadRequest, match="name ''"):  # a kind that names nothing itself
        manager.create({"kind": "sleeper", "name": ""}, (manager.kinds["sleeper"], {}))
    assert manager.state_dir.is_dir() and (manager.state_dir / ".lock").exists()
    assert not manager.needs_slow_validation({"kind": ["x"]})
