"""What the JupyterLab panel reads beyond the records (aifab.extension.panel): the placement
in words, the browser's address, a run's progress from its metrics stream."""

from __future__ import annotations

import json

from aifab.extension import panel
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
