"""A class pressing Start at once, on the real Slurm and a real hub: twenty sessions start
together, the hub asks Slurm with one squeue per round for all of them, the start line tells
the waiting ones their place, nothing blocks the hub's event loop; and a slurmctld that stops
answering for 20 s kills no session.

The single-user server is tests/tiny_singleuser.py: what is measured is the hub and Slurm,
not twenty Jupyter servers on two cores.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests

from aifab.spawners.loadtest import hub_metrics, slurm_commands
from tests.slurm_hub import create_class, make_slurm_hub

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "tiny_singleuser.py"
GAP = 2.0  # the shared poller's least seconds between two rounds
OPTIONS = {"profile": "gh200", "gpus": 0, "cpus": 1, "memory_gb": 4, "walltime": "00:30:00"}
STARTS = 8  # sessions starting at once; the others wait in the hub's line

pytestmark = [pytest.mark.slurm, pytest.mark.hub]


@pytest.fixture(scope="module")
def class_hub(slurm, work_root):
    root = Path(tempfile.mkdtemp(prefix="class-hub-", dir=work_root))
    root.chmod(0o755)
    violations = root / "loop-violations.txt"
    hub = make_slurm_hub(root, extra=f"""
c.SlurmSessionSpawner.cmd = [{str(TINY)!r}]
c.SlurmSessionSpawner.shared_poll_gap = {GAP}
c.SlurmSessionSpawner.shared_poll_max_backoff = 8
c.PlacementSpawner.concurrent_starts = {STARTS}
c.JupyterHub.concurrent_spawn_limit = 100
c.Spawner.poll_interval = 2
import sys
sys.path.insert(0, {str(REPO)!r})
import tests.loop_guard
tests.loop_guard.install({str(violations)!r})
""")
    hub.start()
    hub.violations = violations
    yield hub
    hub.stop()
    jobs = [r["job_id"] for r in slurm.squeue() if r["name"].startswith("aifab-class-")]
    if jobs:
        slurm.run("scancel", *jobs, check=False)


def controller_job_queries(slurm) -> int:
    """REQUEST_JOB_INFO* RPCs slurmctld has served (its own statistics, sdiag)."""
    out = slurm.run("sdiag").stdout
    return sum(int(n) for n in re.findall(r"^\s*REQUEST_JOB_INFO\w*\s+\(\s*\d+\)\s+count:(\d+)",
                                          out, re.M))


def squeue_calls(hub) -> int:
    return squeue_and_rounds(hub)[0]


def squeue_and_rounds(hub) -> tuple[int, int]:
    """squeue commands the hub ran, and the shared poller's rounds, from one scrape."""
    metrics = hub_metrics(hub.url, hub.token)
    return (slurm_commands(metrics).get("squeue", 0),
            int(metrics.get("aifab_slurm_poll_rounds_total", 0)))


def start_all(hub, users):
    threads = [threading.Thread(target=hub.api, args=("POST", f"/users/{u}/server"),
                                kwargs={"json": OPTIONS, "timeout": 120}) for u in users]
    for t in threads:
        t.start()
    return threads


def read_progress(hub, user, into: list, stop: threading.Event) -> None:
    """The messages of a user's start page (the hub's progress stream), as a browser reads."""
    while not stop.is_set():
        try:
            r = requests.get(f"{hub.url}/hub/api/users/{user}/server/progress", stream=True,
                             headers={"Authorization": f"token {hub.token}"}, timeout=60)
        except requests.RequestException:
            time.sleep(0.05)
            continue
        if r.status_code != 200:  # not pending yet
            time.sleep(0.05)
            continue
        for line in r.iter_lines(decode_unicode=True):
            if line and line.startswith("data:"):
                event = json.loads(line[5:])
                into.append(event.get("message", ""))
                if event.get("ready") or event.get("failed"):
                    return
        return


def stop_all(hub, slurm, users):
    for u in users:
        hub.api("DELETE", f"/users/{u}/server")
    for u in users:
        hub.wait_for_stopped(u, timeout=90)
    slurm.wait_for(lambda: not [r for r in slurm.squeue() if r["name"] in
                                {f"aifab-{u}" for u in users}], 60, what="the class's jobs gone")


def test_twenty_sessions_start_together_on_one_squeue_per_round(class_hub, slurm):
    hub = class_hub
    users = create_class(hub, "class-", 20)
    (before_calls, before_rounds), before_rpcs = (squeue_and_rounds(hub),
                                                  controller_job_queries(slurm))
    stop, messages = threading.Event(), {u: [] for u in users}
    readers = [threading.Thread(target=read_progress, args=(hub, u, messages[u], stop),
                                daemon=True) for u in users]
    for t in readers:
        t.start()
    t0 = time.monotonic()
    threads = start_all(hub, users)

    # the REST API keeps answering while they start (its latency is the benchmark's business)
    answers = []
    while not all(hub.user_model(u)["servers"].get("", {}).get("ready") for u in users):
        assert time.monotonic() - t0 < 300, f"not all ready after 300 s\n{hub.log_tail()}"
        answers.append(hub.api("GET", "/users/class-00").status_code)
        time.sleep(0.2)
    window = time.monotonic() - t0
    (after_calls, after_rounds), after_rpcs = (squeue_and_rounds(hub),
                                               controller_job_queries(slurm))
    stop.set()
    for t in threads + readers:
        t.join(30)
    assert answers and set(answers) == {200}

    calls = after_calls - before_calls
    # and all of them were the shared poller's rounds: no session asked about its own job
    assert calls == after_rounds - before_rounds, (calls, after_rounds - before_rounds)
    # one round per GAP (jitter: at least 0.75 GAP apart), plus the first; twenty sessions
    # polling their own jobs as batchspawner does would be more than twenty in the first
    # second alone
    assert 1 <= calls <= math.ceil(window / (0.75 * GAP)) + 1, (calls, window)
    # slurmctld saw those (nothing else asks it about jobs meanwhile); a round may fall
    # between a metrics scrape and sdiag, at either end of the window
    assert calls - 1 <= after_rpcs - before_rpcs <= calls + 1, (after_rpcs - before_rpcs, calls)

    # the start page of those who waited in line said how many were starting before them
    said = [m for u in users for m in messages[u]
            if re.fullmatch(r"\d+ sessions? (?:are|is) starting before yours", m)]
    assert said, {u: messages[u] for u in users[-5:]}
    assert max(int(m.split()[0]) for m in said) >= STARTS

    # the hub's event loop never waited for a subprocess
    text = hub.violations.read_text() if hub.violations.exists() else ""
    assert not text, f"blocking subprocess calls on the hub's event loop:\n{text[:4000]}"

    stop_all(hub, slurm, users)


def test_a_silent_slurmctld_kills_no_session_and_polls_back_off(class_hub, slurm):
    hub = class_hub
    users = create_class(hub, "class-", 5)
    for t in start_all(hub, users):
        t.join(120)  # the hub has taken every start (it answers within its 10 s)
    for u in users:
        hub.wait_for_server(u, timeout=120)

    ctld = int((slurm.root / "run" / "slurmctld.pid").read_text())
    log_start = hub.log_path.stat().st_size
    before = squeue_calls(hub)
    os.kill(ctld, signal.SIGSTOP)  # it answers nothing: squeue times out
    try:
        time.sleep(20)  # the hub polls every 2 s meanwhile
        during = squeue_calls(hub) - before
        for u in users:  # nobody was declared gone
            assert hub.user_model(u)["servers"].get("", {}).get("ready"), (u, hub.log_tail())
    finally:
        os.kill(ctld, signal.SIGCONT)
    # five sessions polled ten times each: a handful of rounds, each waiting longer
    assert 1 <= during <= 6, during
    log = hub.log_path.read_bytes()[log_start:].decode(errors="replace")
    # the hub said why, and when it tries again (the doubling itself: tests/unit)
    assert re.search(r"squeue for 5 session job\(s\) failed \(squeue .*\); next try in about "
                     r"\d+ s", log), log[-3000:]

    # seen again when it answers: the hub's polls go on, every session still there
    deadline = time.monotonic() + 60
    while "squeue answers again" not in hub.log_path.read_bytes()[log_start:].decode(
            errors="replace"):
        assert time.monotonic() < deadline, hub.log_tail()
        time.sleep(0.5)
    for u in users:
        assert hub.user_model(u)["servers"].get("", {}).get("ready"), u
    stop_all(hub, slurm, users)
