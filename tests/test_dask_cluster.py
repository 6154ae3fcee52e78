"""aifab.cluster() and its widget on the real Slurm fixture: scaling through the widget, pending
reasons, adaptive scaling in whole jobs, and no orphaned worker jobs (cluster close, kernel
kill -9 or exit, session start sweep, session end)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from IPython.core.error import UsageError

from aifab.extension import dask_jobs as cluster_jobs
from aifab.extension.dask_panel import DaskClusters, Registration
from aifab.magics.dask_cluster import ClusterOptionError, slurm_settings, wait_for_workers
from aifab.session import Session
from tests.harness.jupyter import JupyterServer

pytestmark = pytest.mark.slurm

# What a Slurm session's kernel sees (the spawner exports these) on the loopback-only test node.
SESSION_ENV = {"AIFAB_BACKEND": "slurm", "AIFAB_SLURM_PARTITION": "debug",
               "AIFAB_DASK_INTERFACE": "lo", "JUPYTERHUB_USER": "dask-tester",
               "JUPYTERHUB_SERVER_NAME": ""}
SMALL = {"cores": 1, "memory": "1GiB"}


@pytest.fixture
def slurm_session(slurm, monkeypatch):
    for k, v in SESSION_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AIFAB_WALLTIME_END", str(int(time.time()) + 3 * 3600))
    yield slurm
    leftovers = [r["job_id"] for r in slurm.squeue() if r["name"] == cluster_jobs.JOB_NAME]
    if leftovers:
        slurm.run("scancel", *leftovers, check=False)


def dask_jobs(slurm) -> list[dict]:
    return [r for r in slurm.squeue() if r["name"] == cluster_jobs.JOB_NAME]


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s: {what}")
        time.sleep(0.1)


# ------------------------------------------------------------------ settings and bad input
def test_job_settings_come_from_the_session_and_bad_options_are_refused():
    now = 1_000_000.0
    session = Session(backend="slurm", slurm_partition="gh200", slurm_account="a-lp01",
                      slurm_reservation="workshop", walltime_end=now + 3600)
    s = slurm_settings(session, {"cores": 8, "memory": "32GiB", "walltime": "04:00:00"},
                       now=now)
    assert s["queue"] == "gh200" and s["account"] == "a-lp01"
    assert "--reservation=workshop" in s["job_extra_directives"]
    # never longer than the session has left (less the margin), in whole minutes
    assert s["walltime"] == "00:58:00"
    assert s["job_name"] == "aifab-dask" and s["security"] is True
    comment = next(d for d in s["job_extra_directives"] if d.startswith("--comment="))
    assert f"session={cluster_jobs.session_key()}" in comment
    assert f":{os.getpid()}:" in comment
    assert not any(d.startswith("--gres") for d in s["job_extra_directives"])  # CPU workers
    assert "--gres=gpu:2" in slurm_settings(session, {"gpus_per_worker": 2},
                                            now=now)["job_extra_directives"]
    # a job runs `processes` workers, each with its GPUs
    assert "--gres=gpu:4" in slurm_settings(session, {"gpus_per_worker": 2, "processes": 2,
                                                      "cores": 2}, now=now)["job_extra_directives"]
    # a number is minutes, as Slurm reads it
    assert slurm_settings(session, {"walltime": 30}, now=now)["walltime"] == "00:30:00"
    assert s["scheduler_options"]["dashboard_address"] == "127.0.0.1:0"
    # worker logs in a private folder, not a slurm-NNN.out per job in the notebook's folder
    assert s["log_directory"].endswith("aifab/dask-logs")

    bad = [
        ({"coers": 4}, "unknown option 'coers'.*did you mean 'cores'"),
        ({"job_name": "x"}, "'job_name' cannot be set"),
        ({"job_extra_directives": ["--comment=mine"]}, "set by aifab"),
        ({"processes": 4, "cores": 2}, "processes=4 must be a whole number from 1 to 2"),
        ({"memory": "lots"}, "memory='lots' must be an amount"),
        ({"walltime": "soon"}, "walltime: 'soon' is not a walltime; write"),
        ({"queue": "debug; rm -rf /"}, "queue='debug; rm -rf /': letters, digits"),
        ({"interface": "hsn9"}, "interface='hsn9' does not exist here"),
        ({"gpus_per_worker": -1}, "gpus_per_worker=-1"),
        ({"walltime": "00:30"}, "less than a minute"),
        ({"job_extra_directives": ["--time=99:00:00"]}, "set by aifab"),
        ({"job_extra_directives": [" "]}, "must be one line of text"),
        ({"job_directives_skip": ["-J"]}, "the job name, comment and time"),
    ]
    for overrides, message in bad:
        with pytest.raises(ClusterOptionError, match=message):
            slurm_settings(session, overrides, now=now)
    with pytest.raises(ClusterOptionError, match="the session has 100 s left"):
        slurm_settings(session, {}, now=now + 3500)


def test_worker_jobs_get_no_secrets_gpus_or_session_job_variables():
    env = {"PATH": "/usr/bin", "HOME": "/home/ada", "SLURM_CONF": "/etc/slurm/slurm.conf",
           "JUPYTERHUB_API_TOKEN": "t", "AWS_SECRET_ACCESS_KEY": "s", "OPENAI_API_KEY": "k",
           "MINIO_KEY": "k", "DB_PASSWORD": "p", "HF_TOKEN": "h", "CUDA_VISIBLE_DEVICES": "0,1",
           "SLURM_JOB_ID": "7", "SLURM_MEM_PER_NODE": "1000", "SBATCH_PARTITION": "gh200",
           "KEYCLOAK_URL": "https://id", "MONKEY": "fine"}
    assert cluster_jobs.submit_env(env) == {
        "PATH": "/usr/bin", "HOME": "/home/ada", "SLURM_CONF": "/etc/slurm/slurm.conf",
        "KEYCLOAK_URL": "https://id", "MONKEY": "fine"}


def test_local_session_gets_a_local_cluster_and_refuses_slurm_options(monkeypatch):
    import aifab

    monkeypatch.setenv("AIFAB_BACKEND", "local")
    with pytest.raises(ClusterOptionError, match="'queue' applies to Slurm sessions"):
        aifab.cluster(queue="debug")
    with pytest.raises(ClusterOptionError, match="unknown option 'n_threads'"):
        aifab.cluster(n_threads=2)
    with pytest.raises(ClusterOptionError, match="workers=-2"):
        aifab.cluster(workers=-2)


# ------------------------------------------------------------------ the widget drives Slurm
def test_widget_scales_the_real_slurm_cluster_and_shows_pending_reasons(slurm_session,
                                                                        monkeypatch):
    import aifab

    slurm = slurm_session
    # a secret and a GPU list in the kernel's environment must not reach the worker jobs
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "secret-token-for-the-test")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    for var in ("AIFAB_SERVER_URL", "JUPYTERHUB_SERVICE_PREFIX", "JUPYTERHUB_SERVICE_URL"):
        monkeypatch.delenv(var, raising=False)
    blocker = slurm.run("sbatch", "--parsable", "--exclusive", "-p", "debug", "-J", "blocker",
                        "--output=/dev/null", "--wrap", "sleep 600").stdout.strip()
    slurm.wait_for(lambda: any(r["job_id"] == blocker and r["state"] == "RUNNING"
                               for r in slurm.squeue()), 30, what="the blocker running")
    cluster = aifab.cluster(**SMALL)
    try:
        widget = cluster._widget()
        assert widget.requested == widget.running == widget.pending == 0
        widget.scale_input.value = 2
        widget.scale_button.click()
        # the node is full: both jobs wait, and the widget says why with Slurm's reasons (the
        # first waits for Resources, the one behind it for Priority)
        wait(lambda: widget.pending == 2 and "Resources" in widget.pending_reasons,
             30, "2 pending workers with reason Resources in the widget")
        assert set(widget.pending_reasons) <= {"Resources", "Priority"}
        assert widget.requested == 2 and widget.running == 0
        assert "pending <b>2</b> (Resources" in widget.counts.value
        jobs = dask_jobs(slurm)
        assert len(jobs) == 2 and all(j["state"] == "PENDING" for j in jobs)
        # what the JupyterLab panel shows of it: the server side of the kernel's registration
        panel = DaskClusters(cluster.session_key, logging.getLogger("test"))
        panel.register(Registration.from_body("c1", cluster._aifab_registration.body()))
        [shown] = asyncio.run(panel.overview())
        assert (shown["backend"], shown["requested"], shown["pending"], shown["jobs_queued"],
                shown["running"]) == ("slurm", 2, 2, 2, 0)
        assert "Resources" in shown["pending_reasons"] and shown["slurm_note"] == ""

        slurm.run("scancel", blocker)
        wait(lambda: widget.running == 2 and widget.pending == 0, 60,
             "2 running workers in the widget")
        assert len([j for j in dask_jobs(slurm) if j["state"] == "RUNNING"]) == 2
        assert "in use: 2 threads" in widget.resources.value
        # no Jupyter server in this test: the link is the dashboard itself, on loopback (the
        # link through the Jupyter proxy is checked in the %dask test below)
        port = cluster.scheduler_info["services"]["dashboard"]
        assert f"href='http://127.0.0.1:{port}/status'" in widget.dashboard.value

        from distributed import Client

        with Client(cluster) as client:
            env = client.run(lambda: {k: os.environ.get(k) for k in
                                      ("JUPYTERHUB_API_TOKEN", "CUDA_VISIBLE_DEVICES")})
            assert client.scheduler_info()["address"].startswith("tls://127.0.0.1:")
        for worker_env in env.values():
            assert worker_env["JUPYTERHUB_API_TOKEN"] is None
            assert worker_env["CUDA_VISIBLE_DEVICES"] != "0,1"

        widget.scale_input.value = 0
        widget.scale_button.click()
        wait(lambda: not dask_jobs(slurm), 30, "the worker jobs leaving squeue")
        wait(lambda: widget.running == 0 and widget.requested == 0, 30,
             "the widget counting 0 workers")
    finally:
        cluster.close()
        slurm.run("scancel", blocker, check=False)


def test_gpu_workers_on_request_get_their_gpus(slurm_session):
    from distributed import Client

    import aifab

    cluster = aifab.cluster(workers=1, gpus_per_worker=1, **SMALL)
    try:
        with Client(cluster) as client:
            client.wait_for_workers(1, timeout=60)
            visible = list(client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES")).values())
        assert len(visible) == 1 and visible[0] is not None and len(visible[0].split(",")) == 1
        assert "gpu" in dask_jobs(slurm_session)[0]["gres"]
    finally:
        cluster.close()
    wait(lambda: not dask_jobs(slurm_session), 30, "the GPU worker job leaving squeue")


def test_adapt_with_two_processes_per_job_settles_on_whole_jobs(slurm_session):
    """dask-jobqueue #498: minimum 3 with 2 processes per job must not add and retire a job
    forever. The bounds become whole jobs (2 jobs = 4 workers) and the job set stays put."""
    import aifab

    slurm = slurm_session
    cluster = aifab.cluster(cores=2, processes=2, memory="2GiB")
    try:
        adaptive = cluster._widget()
        adaptive.adapt_min.value, adaptive.adapt_max.value = 3, 5
        adaptive.adapt_button.click()
        assert "between 4 and 4 workers (2 per job)" in adaptive.message.value
        wait_for_workers(cluster, 4, timeout=90)
        seen: set[str] = set()
        end = time.monotonic() + 8  # several adaptive intervals (1 s each)
        while time.monotonic() < end:
            seen |= {j["job_id"] for j in dask_jobs(slurm)}
            time.sleep(0.25)
        assert len(seen) == 2, f"jobs came and went: {sorted(seen)}"
        assert len(cluster.scheduler_info["workers"]) == 4
    finally:
        cluster.close()
    wait(lambda: not dask_jobs(slurm), 30, "the worker jobs leaving squeue")


# ------------------------------------------------------------------ no orphans
KERNEL_CODE = textwrap.dedent("""
    import aifab
    from aifab.magics.dask_cluster import wait_for_workers
    cluster = aifab.cluster(workers=2, cores=1, memory="1GiB")
    wait_for_workers(cluster, 2, timeout=90)
    print("workers", len(cluster.scheduler_info["workers"]))
""")


@pytest.mark.parametrize("how", ["kill -9", "shutdown"])
def test_kernel_end_cancels_its_worker_jobs(slurm_session, how):
    from jupyter_client.manager import KernelManager

    slurm = slurm_session
    km = KernelManager(kernel_name="aifab")
    km.start_kernel(env={**os.environ})
    kc = km.client()
    kc.start_channels()
    outputs: list[dict] = []
    try:
        kc.wait_for_ready(timeout=60)
        reply = kc.execute_interactive(KERNEL_CODE, timeout=120,
                                       output_hook=lambda m: outputs.append(m))
        assert reply["content"]["status"] == "ok", reply["content"]
    finally:
        kc.stop_channels()
    assert any("workers 2" in m["content"].get("text", "") for m in outputs)
    jobs = dask_jobs(slurm)
    assert len(jobs) == 2 and all(j["state"] == "RUNNING" for j in jobs)
    pid = km.provisioner.process.pid
    t0 = time.monotonic()
    if how == "kill -9":
        os.kill(pid, signal.SIGKILL)
    else:
        km.shutdown_kernel(now=False)
    wait(lambda: not dask_jobs(slurm), 10, f"the worker jobs gone within 10 s of {how}")
    print(f"jobs gone {time.monotonic() - t0:.2f} s after {how}")
    if how == "kill -9":
        km.cleanup_resources()


def _sbatch_tagged(slurm, session: str, kernel: cluster_jobs.KernelRef) -> str:
    return slurm.run(
        "sbatch", "--parsable", "-p", "debug", "-J", cluster_jobs.JOB_NAME,
        f"--comment={cluster_jobs.comment(session, kernel)}", "-c", "1",
        "--output=/dev/null", "--wrap", "sleep 600").stdout.strip()


def test_session_start_sweeps_dead_kernels_jobs_and_session_end_cancels_the_rest(
        slurm_session, tmp_path):
    slurm = slurm_session
    env = {**SESSION_ENV, "JUPYTERHUB_USER": "sweep-tester"}
    session = cluster_jobs.session_key(env)
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_ref = cluster_jobs.KernelRef(host, dead.pid, cluster_jobs.process_start(dead.pid))
    dead.wait()
    live = subprocess.Popen(["sleep", "600"])
    live_ref = cluster_jobs.KernelRef(host, live.pid, cluster_jobs.process_start(live.pid))
    other = cluster_jobs.session_key({"JUPYTERHUB_USER": "someone-else"})
    try:
        orphan = _sbatch_tagged(slurm, session, dead_ref)
        kept = _sbatch_tagged(slurm, session, live_ref)
        foreign = _sbatch_tagged(slurm, other, dead_ref)
        with JupyterServer(tmp_path / "server", env=env) as server:
            ids = {j["job_id"] for j in dask_jobs(slurm)}
            assert orphan not in ids, "the dead kernel's job survived the start sweep"
            assert kept in ids and foreign in ids
        ids = {j["job_id"] for j in dask_jobs(slurm)}
        assert kept not in ids, "the session's jobs survived the end of the session"
        assert foreign in ids, "another session's job was cancelled"
        assert "cancelled dask worker jobs" in server.log_path.read_text()
    finally:
        live.kill()


# ------------------------------------------------------------------ dashboard and %dask
def test_dask_magic_and_the_dashboard_through_the_jupyter_proxy(monkeypatch, tmp_path,
                                                                ipython_on):
    import requests

    monkeypatch.setenv("AIFAB_BACKEND", "local")
    with JupyterServer(tmp_path / "server") as server:
        shell = ipython_on(server)
        with pytest.raises(UsageError, match="unknown option 'wokers'.*did you mean 'workers'"):
            shell.run_line_magic("dask", "wokers=1")
        with pytest.raises(UsageError, match="'oops' is not KEYWORD=VALUE"):
            shell.run_line_magic("dask", "oops")
        cluster = shell.run_line_magic("dask", "workers=1 threads_per_worker=1")
        try:
            assert shell.user_ns["cluster"] is cluster
            assert shell.run_line_magic("dask", "") is cluster
            with pytest.raises(UsageError, match="a cluster from %dask is running"):
                shell.run_line_magic("dask", "workers=3")  # never a second one, leaking
            # TLS even on loopback: other users of this machine cannot talk to the scheduler
            assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
            widget = cluster._widget()
            wait(lambda: widget.running == 1, 60, "1 local worker")
            port = cluster.scheduler_info["services"]["dashboard"]
            link = f"/proxy/{port}/status"
            assert link in widget.dashboard.value
            page = server.get(link.lstrip("/"))
            assert page.status_code == 200 and "Dask" in page.text
            # the JupyterLab panel's view (the kernel registered its cluster with the server)
            cluster._aifab_registration.flush()
            [shown] = server.get("aifab/api/dask").json()
            assert (shown["backend"], shown["requested"], shown["running"],
                    shown["pending"], shown["dashboard_path"]) == \
                ("local", 1, 1, 0, f"proxy/{port}/status")
            anonymous = requests.get(server.url + link.lstrip("/"), allow_redirects=False,
                                     timeout=10)
            assert anonymous.status_code in (302, 403) and "Dask" not in anonymous.text
        finally:
            shell.run_line_magic("dask", "close")
        assert cluster.status.name == "closed"
        cluster._aifab_registration.flush()
        assert server.get("aifab/api/dask").json() == []  # closed: gone from the panel
