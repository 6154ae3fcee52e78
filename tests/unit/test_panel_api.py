"""What the JupyterLab panel reads beyond the records (aifab.extension.panel): the placement
in words, the browser's address, a run's progress from its metrics stream; the dask clusters
kernels register (aifab.extension.dask_panel); a run's Resume request."""

from __future__ import annotations

import json

import pytest

from aifab.api import BadRequest
from aifab.extension import panel
from aifab.extension.dask_panel import DaskClusters, Registration
from aifab.session import Session


def test_placement_says_where_the_session_runs():
    assert panel.placement(Session(backend="slurm", slurm_job_id="1234"), "nid001") == \
        "Slurm job 1234 on nid001"
    assert panel.placement(Session(backend="kubernetes", pod_name="jupyter-ada"), "x") == \
        "pod jupyter-ada"
    assert panel.placement(Session(), "laptop") == "this machine (laptop)"


def test_public_url_is_the_hubs_address_never_the_internal_one():
    env = {"JUPYTERHUB_PUBLIC_URL": "https://hub.example.org/user/ada",
           "JUPYTERHUB_SERVICE_URL": "http://127.0.0.1:41234/user/ada/"}
    assert panel.public_url(env) == "https://hub.example.org/user/ada/"
    assert panel.public_url({"AIFAB_PUBLIC_URL": "https://h/u/", **env}) == "https://h/u/"
    assert panel.public_url({"JUPYTERHUB_SERVICE_URL": "http://127.0.0.1:1/"}) == ""


def _stream(*records) -> list[str]:
    return [json.dumps(r) for r in records]


def test_progress_of_a_running_run_has_steps_loss_curve_and_eta():
    lines = _stream(
        {"event": "start", "time": 0},
        {"event": "step", "step": 5, "total": 80, "loss": 3.0, "time": 100.0},
        {"event": "step", "step": 10, "total": 80, "loss": 2.0, "time": 105.0,
         "tokens_per_s": 900.0},
        {"event": "checkpoint", "step": 10, "path": "/out/checkpoints/checkpoint-10"},
    ) + ['{"event": "step", "st']  # a line being written
    p = panel.run_progress(lines)
    assert (p["step"], p["total"], p["loss"], p["losses"]) == (10, 80, 2.0, [3.0, 2.0])
    assert p["eta_s"] == 70.0  # one step a second, 70 to go
    assert p["checkpoint"] == "/out/checkpoints/checkpoint-10"
    assert p["tokens_per_s"] == 900.0 and p["output"] == ""


def test_progress_counts_this_attempt_only_and_a_done_run_has_no_eta():
    lines = _stream(
        {"event": "start", "time": 0},
        {"event": "step", "step": 40, "total": 80, "loss": 9.0, "time": 10},
        {"event": "interrupted", "reason": "SIGTERM", "step": 40},
        {"event": "start", "time": 20},  # --resume
        {"event": "step", "step": 80, "total": 80, "loss": 1.0, "time": 30},
        {"event": "done", "step": 80, "output": "/out"},
    )
    p = panel.run_progress(lines)
    assert (p["step"], p["losses"], p["eta_s"], p["output"]) == (80, [1.0], 0, "/out")
    assert p["interrupted"] == ""


def test_a_long_run_is_thinned_to_a_sparkline_keeping_its_last_point():
    lines = _stream(*({"event": "step", "step": i, "total": 1000, "loss": 1000 - i, "time": i}
                      for i in range(1, 1001)))
    p = panel.run_progress(lines)
    assert len(p["losses"]) == panel.SPARK_POINTS
    assert p["losses"][0] == 999 and p["losses"][-1] == 0


def test_no_stream_yet_is_an_empty_progress():
    p = panel.run_progress([])
    assert (p["step"], p["total"], p["loss"], p["losses"], p["eta_s"]) == (0, 0, None, [], None)


# ------------------------------------------------------------------ dask clusters in the panel
def _body(**over) -> dict:
    import os

    from aifab.extension import dask_jobs

    me = dask_jobs.KernelRef.this_process()
    assert me.pid == os.getpid()
    return {"name": "SessionLocalCluster", "backend": "local", "requested": 2,
            "processes_per_job": 1, "dashboard_port": 8787,
            "kernel": {"host": me.host, "pid": me.pid, "start": me.start}, **over}


@pytest.mark.parametrize("over, message", [
    ({"backend": "yarn"}, "backend 'yarn': one of slurm, local, kubernetes"),
    ({"requested": -1}, "requested=-1: an integer from 0 to 100000"),
    ({"requested": True}, "requested=True: an integer from 0 to 100000"),
    ({"dashboard_port": 70000}, "dashboard_port=70000: an integer from 1 to 65535"),
    ({"kernel": "me"}, "kernel: {host, pid, start} of the kernel that owns the cluster"),
    ({"name": "<img src=x>"}, "name '<img src=x>': up to 200 letters, digits and . : / - _"),
    ({"command": "rm"}, "command: not a field; allowed: backend, dashboard_port, kernel, "
                        "name, processes_per_job, requested"),
])
def test_a_cluster_registration_is_checked_field_by_field(over, message):
    with pytest.raises(BadRequest) as refused:
        Registration.from_body("c1", _body(**over))
    assert str(refused.value) == message


def test_a_cluster_whose_kernel_died_leaves_the_panel(tmp_path):
    import asyncio
    import logging
    import subprocess
    import sys

    from aifab.extension import dask_jobs

    clusters = DaskClusters("0" * 16, logging.getLogger("test"))
    clusters.register(Registration.from_body("mine", _body(dashboard_port=None)))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ref = dask_jobs.KernelRef.this_process()
        start = dask_jobs.process_start(other.pid)
        body = _body(dashboard_port=None,
                     kernel={"host": ref.host, "pid": other.pid, "start": start})
        clusters.register(Registration.from_body("theirs", body))
        # (a local cluster: no squeue; no dashboard: nothing to ask)
        seen = asyncio.run(clusters.overview())
        assert sorted(c["id"] for c in seen) == ["mine", "theirs"]
        assert {c["running"] for c in seen} == {None}
        assert {c["dashboard_path"] for c in seen} == {""}
    finally:
        other.kill()
        other.wait()
    assert [c["id"] for c in asyncio.run(clusters.overview())] == ["mine"]
    clusters.unregister("mine")
    assert asyncio.run(clusters.overview()) == []


# ------------------------------------------------------------------ Resume of a run
def _run_record(tmp_path, **over):
    from aifab.extension.records import Service

    fields = dict(name="pong", kind="finetune", argv=["python"], gpus=[], port=0, api_key="k",
                  dir=str(tmp_path / "svc"), status="stopped", output=str(tmp_path / "out"),
                  request={"model": "/m", "data": "/d.jsonl", "max_steps": 150,
                           "resume": False})
    return Service(**{**fields, **over})


def _finetune_kind(tmp_path):
    from aifab.extension.kinds import KindContext
    from aifab.extension.kinds.finetune import FineTuneKind

    return FineTuneKind(KindContext(session=Session(), state_dir=tmp_path))


def test_a_record_of_an_earlier_version_loads_without_the_new_fields(tmp_path):
    from aifab.extension.records import Service

    old = {"name": "pong", "kind": "finetune", "argv": ["python"], "gpus": [], "port": 0,
           "api_key": "k", "dir": str(tmp_path), "status": "stopped"}
    (tmp_path / "record.json").write_text(json.dumps(old))
    svc = Service.load(tmp_path / "record.json")
    assert (svc.request, svc.slurm_step) == ({}, "")


def test_resume_continues_a_stopped_run_with_the_options_it_was_started_with(tmp_path):
    kind = _finetune_kind(tmp_path)
    ckpt = tmp_path / "out" / "checkpoints" / "checkpoint-40"
    ckpt.mkdir(parents=True)
    svc = _run_record(tmp_path)
    with pytest.raises(BadRequest, match="saved no complete checkpoint"):
        kind.resume_request(svc)  # a checkpoint folder without its marker is half-written
    (ckpt / "aifab-complete").write_text("40")
    assert kind.resume_request(svc) == {"model": "/m", "data": "/d.jsonl", "max_steps": 150,
                                        "resume": True, "kind": "finetune", "name": "pong"}


@pytest.mark.parametrize("over, message", [
    ({"status": "finished"}, "run 'pong' finished: there is nothing to resume"),
    ({"request": {}}, "run 'pong' was started by an earlier version that kept no options"),
    ({"kind": "vllm"}, "'pong' is a vllm service: only fine-tune runs resume"),
])
def test_resume_refuses_what_cannot_continue(tmp_path, over, message):
    from aifab.extension.kinds.base import ServiceKind

    svc = _run_record(tmp_path, **over)
    kind = _finetune_kind(tmp_path) if svc.kind == "finetune" else ServiceKind(None)
    with pytest.raises(BadRequest) as refused:
        kind.resume_request(svc)
    assert str(refused.value).startswith(message)
