"""The JupyterLab panel and status bar in a real browser: Playwright drives Debian's chromium
through the demo hub (`make demo`'s config, its local profile, a walltime of 17.5 minutes so
the countdown turns to its warning while the test runs). One hub, one session and one page
are shared by the checks below, in order: the status bar; `%serve` from a notebook that is
then closed, the service reaching "ready" in the panel with a browser URL that answers in a
new tab; a log line and a rejected name with HTML in them shown as text; a `%finetune` whose
progress moves; Stop from the panel ending the vLLM process (psutil); "Serve this adapter" of
the finished run and "aifab: stop service…"; a run stopped and resumed from the panel; a
notebook's dask cluster with its workers and dashboard; the launcher's cards; no polling
while the panel is closed; the walltime warning. Then, on servers of their own: the extension
under `c.ServerApp.base_url`, and a queued Slurm allocation released from the panel.
Screenshots go to test-artifacts/panel/ (two of them are in docs/user-guide.md)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import requests

from tests.harness.chromium import launch
from tests.harness.hub import Hub, free_port
from tests.harness.jupyter import JupyterServer

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "demo" / "jupyterhub_config.py"

SHOTS = REPO / "test-artifacts" / "panel"
USER = "panel"
WALLTIME = "00:17:30"  # over the 15 minutes of the warning at the start, under it soon after
XSS_LOG = '<script>window.__aifab_xss = "log"</script><b>not bold</b>'
XSS_NAME = '<img src=x onerror="window.__aifab_xss = 1">'
# enough steps that the run is still going when the stop test comes (on a fast machine it
# once finished 150 before the Stop button was pressed; here 20 steps take a second), few
# enough to finish in minutes
STEPS = 2000

pytestmark = [pytest.mark.browser, pytest.mark.hub, pytest.mark.vllm]


def _notebook(*cells: str) -> str:
    return json.dumps({
        "cells": [{"cell_type": "code", "id": f"cell-{i}", "metadata": {}, "source": c,
                   "outputs": [], "execution_count": None} for i, c in enumerate(cells)],
        "metadata": {"kernelspec": {"display_name": "Python 3 (aifab)", "language": "python",
                                    "name": "aifab"}},
        "nbformat": 4, "nbformat_minor": 5})


@pytest.fixture(scope="module")
def hub(work_root, tiny_model):
    root = Path(tempfile.mkdtemp(prefix="panel-hub-", dir=work_root))
    root.chmod(0o755)
    state = root / "demo-state"
    (state / "models").mkdir(parents=True)
    (state / "models" / "tiny-llama").symlink_to(tiny_model)
    # the demo's local profile only: the panel needs no Slurm
    hub = Hub(root, config_file=DEMO_CONFIG,
              env={"AIFAB_DEMO_STATE": str(state), "AIFAB_DEMO_SLURM": "0"})
    hub.start()
    hub.state = state
    hub.home = state / "users" / USER
    hub.password = (state / "password").read_text().strip()
    yield hub
    try:
        hub.api("DELETE", f"/users/{USER}/server")
        hub.wait_for_stopped(USER, timeout=60)
        left = [p.pid for p in _vllm_processes() if _cwd(p).startswith(str(state))]
        assert not left, f"the session's vLLM outlived its server: pids {left}"
    finally:
        hub.stop()


@pytest.fixture(scope="module")
def browser():
    """One chromium for the module (Playwright's sync API allows one at a time)."""
    with launch(SHOTS) as browser:
        yield browser


@pytest.fixture(scope="module")
def lab(hub, browser):
    """A page logged in to the hub, in JupyterLab of a fresh session, the panel open."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    base = hub.url.rstrip("/")
    page.goto(f"{base}/hub/login")
    page.fill("input[name=username]", USER)
    page.fill("input[name=password]", hub.password)
    page.click("input[type=submit], button[type=submit]")
    page.wait_for_selector("input[name=profile][value=local-cpu]")
    page.check("input[name=profile][value=local-cpu]")
    page.fill("input[name='local-cpu--walltime']", WALLTIME)
    page.click("#spawn_form input[type=submit], #spawn_form button[type=submit]")
    page.wait_for_url(f"**/user/{USER}/lab**", timeout=120_000)
    page.wait_for_selector(".jp-Notebook", timeout=120_000)
    page.started = time.time()
    page.base = base
    news = page.get_by_role("button", name="No", exact=True)  # JupyterLab asks about news
    news.or_(page.locator(".aifab-StatusBar")).first.wait_for()
    if news.count():
        news.first.click()
    page.click("li[data-id=aifab-panel]")  # the AI factory icon of the left side bar
    page.locator(".aifab-Panel").get_by_text("Services (0)").wait_for()
    try:
        yield page
    finally:
        page.screenshot(path=SHOTS / "last.png")  # what the person saw at the end
        context.close()


@pytest.fixture(scope="module")
def served(hub, lab):
    """`%serve` run in a notebook that is then closed (its kernel shut down): from here on
    only the panel shows the service. Returns vLLM's own process."""
    (hub.home / "panel-serve.ipynb").write_text(_notebook(
        "from aifab.magics.examples import tutorial_model\nMODEL = tutorial_model()",
        "llm = %serve $MODEL --name chat --max-model-len 256"))
    _run_notebook(lab, "panel-serve.ipynb")
    lab.get_by_text("vLLM: chat").wait_for(timeout=120_000)  # the widget: the request is in
    _close_notebook(lab, "panel-serve.ipynb")
    return _vllm_server_of("chat", hub)


def _run_notebook(page, name: str) -> None:
    page.goto(f"{page.base}/user/{USER}/lab/tree/{name}")
    # this notebook's panel: the one its (current) tab names; others may still be restored
    tab = page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab.lm-mod-current", has_text=name)
    tab.wait_for(timeout=120_000)
    notebook = page.locator(f"[id='{tab.get_attribute('data-id')}'] .jp-Notebook")
    notebook.locator(".jp-Cell").first.wait_for(timeout=120_000)
    page.get_by_text("Python 3 (aifab) | Idle").wait_for(timeout=120_000)
    if not page.locator(".aifab-Panel").is_visible():  # a reload keeps the layout, mostly
        page.click("li[data-id=aifab-panel]")
    # each cell with Shift+Enter, as a person does: the kernel queues them
    cells = notebook.locator(".jp-Cell")
    cells.first.locator(".jp-InputArea-editor").click()
    for i in range(cells.count()):
        page.keyboard.press("Shift+Enter")
        cells.nth(i).locator(".jp-InputPrompt", has_text=re.compile(r"\[[\d*]+\]")).wait_for()


def _close_notebook(page, name: str) -> None:
    page.get_by_role("menuitem", name="File", exact=True).click()
    page.click("li[data-command=\"filemenu:close-and-cleanup\"]")
    dialog = page.locator(".jp-Dialog")
    answer = dialog.get_by_role("button", name=re.compile("^(Ok|Shut Down|Discard|Don.t Save)$"))
    answer.last.click()
    deadline = time.monotonic() + 30
    while dialog.count() and time.monotonic() < deadline:  # then "Save your work?", maybe
        if answer.count():
            answer.last.click()
        time.sleep(0.3)
    page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab", has_text=name).wait_for(state="detached")


def _card(page, name: str, kind: str = "service"):
    return page.locator(f".aifab-Panel [data-{kind}='{name}']")


def test_the_status_bar_says_where_the_session_runs_and_counts_the_walltime_down(lab):
    bar = lab.locator(".aifab-StatusBar")
    bar.get_by_text(re.compile(r"this machine \(.+\) · 1[5-7]m \d\ds left$")).wait_for()
    first = bar.inner_text()
    time.sleep(2.2)
    assert bar.inner_text() != first, "the countdown does not tick"
    assert "aifab-mod-warn" not in (bar.get_attribute("class") or "")
    lab.screenshot(path=SHOTS / "1-panel-and-status-bar.png")


def test_a_served_model_is_ready_in_the_panel_with_a_browser_url_that_answers(lab, served):
    card = _card(lab, "chat")
    card.locator(".aifab-State-ready").wait_for(timeout=400_000)
    link = card.locator(".aifab-Url a")
    url = link.inner_text()
    # the public hub address, never the server-internal one (127.0.0.1:<server port>)
    assert url == f"{lab.base}/user/{USER}/aifab/proxy/chat/v1/", url
    snippet = card.locator(".aifab-Snippet").inner_text()
    assert f'base_url="{url.rstrip("/")}"' in snippet and 'model="chat"' in snippet
    assert "token=" not in url + snippet
    lab.screenshot(path=SHOTS / "2-panel-service-ready.png")
    with lab.context.expect_page() as opened:
        link.click()
    tab = opened.value
    tab.wait_for_load_state()
    assert tab.url == url + "models"
    body = tab.inner_text("body")
    assert '"object"' in body and '"chat"' in body, body[:500]
    tab.close()


def test_a_log_line_and_a_rejected_name_with_html_in_them_show_as_text(lab, hub, served):
    # a line as a served program might print it, in the service's own log
    with open(Path(served.cwd()) / "service.log", "a") as log:
        log.write(XSS_LOG + "\n")
    card = _card(lab, "chat")
    card.get_by_role("button", name="Logs").click()
    card.locator(".aifab-Log", has_text="<script>").wait_for(timeout=30_000)
    assert XSS_LOG in card.locator(".aifab-Log").inner_text()
    assert card.locator(".aifab-Log b, .aifab-Log script").count() == 0
    lab.screenshot(path=SHOTS / "3-log-as-text.png")
    card.get_by_role("button", name="Hide logs").click()

    # the command palette's serve form: the server refuses the name, the form shows why
    lab.keyboard.press("Control+Shift+C")
    lab.keyboard.insert_text("aifab: serve a model")
    lab.locator(".lm-CommandPalette-item", has_text="aifab: serve a model").first.click()
    dialog = lab.locator(".jp-Dialog")
    dialog.locator("input[name=model]").fill(str(hub.state / "models" / "tiny-llama"))
    dialog.locator("input[name=name]").fill(XSS_NAME)
    dialog.get_by_role("button", name="Serve").click()
    error = lab.locator(".jp-Dialog .aifab-Error")
    error.wait_for()
    assert XSS_NAME in error.inner_text() and "lowercase letters" in error.inner_text()
    assert lab.locator(".jp-Dialog img").count() == 0
    lab.screenshot(path=SHOTS / "4-serve-form-error.png")
    dialog.get_by_role("button", name="Cancel").click()
    assert lab.evaluate("window.__aifab_xss") is None
    assert lab.locator(".aifab-Panel [data-service]").count() == 1  # nothing was started


def test_a_finetune_runs_progress_moves_in_the_panel(lab, hub):
    (hub.home / "panel-train.ipynb").write_text(_notebook(
        "from aifab.magics.examples import tutorial_model, write_ping_pong\n"
        "MODEL = tutorial_model()\nwrite_ping_pong('ping.jsonl')",
        f"run = %finetune $MODEL ping.jsonl --name pong --max-steps {STEPS} --lr 1e-3 "
        "--seq-len 64",
        "import aifab\ncluster = aifab.cluster(workers=1)"))
    _run_notebook(lab, "panel-train.ipynb")
    steps = _card(lab, "pong", "run").locator(".aifab-Steps")
    steps.wait_for(timeout=300_000)
    seen: list[int] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(set(seen)) < 3:
        m = re.match(rf"step (\d+)/{STEPS} · loss \d+\.\d{{4}}", steps.inner_text())
        assert m, steps.inner_text()
        seen.append(int(m.group(1)))
        time.sleep(0.5)
    assert len(set(seen)) >= 3 and seen == sorted(seen), seen
    assert _card(lab, "pong", "run").locator(".aifab-Sparkline polyline").count() == 1
    lab.screenshot(path=SHOTS / "5-panel-finetune-progress.png")


def test_a_run_stopped_from_the_panel_resumes_from_its_checkpoint(lab):
    run = _card(lab, "pong", "run")
    run.get_by_role("button", name="Stop", exact=True).click()
    lab.locator(".jp-Dialog").get_by_role("button", name="Stop").click()
    run.locator(".aifab-State-stopped").wait_for(timeout=120_000)
    checkpoint = run.get_by_text(re.compile(r"^last checkpoint: .*checkpoint-(\d+)$"))
    at = int(re.search(r"checkpoint-(\d+)$", checkpoint.inner_text()).group(1))
    assert 0 < at < STEPS
    run.get_by_role("button", name="Resume").click()
    steps = run.locator(".aifab-Steps")
    # this attempt's steps only, counted on from the checkpoint
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        m = re.match(rf"step (\d+)/{STEPS}", steps.inner_text()) if steps.count() else None
        if m and int(m.group(1)) > at and run.locator(".aifab-State-starting").count():
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"the resumed run did not step on from {at}: {run.inner_text()}")
    assert run.get_by_role("button", name="Resume").count() == 0


def test_a_dask_cluster_of_a_notebook_shows_its_workers_and_dashboard(lab, hub):
    card = lab.locator(".aifab-Panel [data-cluster]")
    card.get_by_text("workers: 1 requested · 0 pending · 1 running").wait_for(timeout=120_000)
    link = card.locator(".aifab-Url a")
    href = link.get_attribute("href")
    assert re.fullmatch(rf"{re.escape(lab.base)}/user/{USER}/proxy/\d+/status", href), href
    with lab.context.expect_page() as opened:
        link.click()
    dashboard = opened.value
    dashboard.wait_for_load_state()
    assert "Dask" in dashboard.title(), dashboard.title()
    dashboard.close()


def test_the_launcher_has_a_card_per_kernel_spec_and_the_aifab_commands(lab, hub):
    lab.keyboard.press("Control+Shift+C")
    lab.keyboard.insert_text("New Launcher")
    lab.locator(".lm-CommandPalette-item", has_text="New Launcher").first.click()
    launcher = lab.locator(".jp-Launcher-body").last
    launcher.wait_for()
    labels = launcher.locator(".jp-LauncherCard[data-category=Notebook] .jp-LauncherCard-label")
    shown = {labels.nth(i).inner_text().strip() for i in range(labels.count())}
    r = requests.get(f"{hub.url.rstrip('/')}/user/{USER}/api/kernelspecs", timeout=30,
                     headers={"Authorization": f"token {hub.token}"})
    r.raise_for_status()
    names = {spec["spec"]["display_name"] for spec in r.json()["kernelspecs"].values()}
    assert "Python 3 (aifab)" in names
    assert names <= shown, (names, shown)  # every kernel spec the site defines has its card
    factory = launcher.locator(".jp-LauncherCard[data-category='AI factory'] "
                               ".jp-LauncherCard-label")
    assert {factory.nth(i).inner_text().strip() for i in range(factory.count())} == \
        {"aifab: serve a model…", "aifab: stop service…"}


def test_stop_from_the_panel_ends_the_vllm_process(lab, served):
    card = _card(lab, "chat")
    card.get_by_role("button", name="Stop", exact=True).click()
    lab.locator(".jp-Dialog").get_by_role("button", name="Stop").click()
    card.locator(".aifab-State-stopped").wait_for(timeout=120_000)
    served.wait(timeout=30)  # psutil: raises TimeoutExpired while the process lives
    assert not psutil.pid_exists(served.pid) or \
        psutil.Process(served.pid).status() == psutil.STATUS_ZOMBIE
    assert card.get_by_role("button", name="Stop", exact=True).count() == 0
    lab.screenshot(path=SHOTS / "6-panel-service-stopped.png")


def test_a_finished_run_is_served_from_the_panel_and_stopped_by_the_command(lab, hub):
    run = _card(lab, "pong", "run")
    run.locator(".aifab-State-finished").wait_for(timeout=600_000)
    assert "done: " in run.inner_text()
    run.get_by_role("button", name="Serve this adapter").click()
    card = _card(lab, "pong-srv")
    card.locator(".aifab-State-ready").wait_for(timeout=400_000)
    assert card.locator(".aifab-Url a").inner_text().endswith("/aifab/proxy/pong-srv/v1/")
    server = _vllm_server_of("pong-srv", hub)
    assert any(arg.startswith("pong=") for arg in server.cmdline()), server.cmdline()
    # a second time: the server's refusal (409), word for word as the magics show it
    run.get_by_role("button", name="Serve this adapter").click()
    refusal = lab.locator(".aifab-Panel > .aifab-Error")
    refusal.wait_for()
    assert re.fullmatch(r"serve pong: 409: a service named 'pong-srv' is already ready; stop "
                        r"it first.*", refusal.inner_text(), re.S), refusal.inner_text()

    lab.keyboard.press("Control+Shift+C")
    lab.keyboard.insert_text("aifab: stop service")
    lab.locator(".lm-CommandPalette-item", has_text="aifab: stop service").first.click()
    dialog = lab.locator(".jp-Dialog")
    assert dialog.locator("select[name=service]").input_value() == "pong-srv"
    dialog.get_by_role("button", name="Stop").click()
    card.locator(".aifab-State-stopped").wait_for(timeout=120_000)
    server.wait(timeout=30)


def test_the_panel_does_not_poll_while_it_is_closed(lab):
    polls: list[str] = []

    def seen(request) -> None:
        if "/aifab/api/services" in request.url:
            polls.append(request.url)

    lab.on("request", seen)
    lab.click("li[data-id=aifab-panel]")  # close it
    lab.locator(".aifab-Panel").wait_for(state="hidden")
    time.sleep(1)  # a request already under way
    polls.clear()
    time.sleep(8)  # more than two poll intervals
    assert polls == [], polls
    lab.click("li[data-id=aifab-panel]")  # open it again: fresh at once
    lab.locator(".aifab-Panel").wait_for()
    deadline = time.monotonic() + 5
    while not polls and time.monotonic() < deadline:
        lab.wait_for_timeout(200)
    lab.remove_listener("request", seen)
    assert polls, "the panel did not ask again once opened"


def test_the_countdown_turns_to_a_warning_15_minutes_before_the_end(lab):
    bar = lab.locator(".aifab-StatusBar.aifab-mod-warn")
    # 17.5 minutes from the spawn: the warning is at most 150 s after it, usually long past
    bar.wait_for(timeout=max(5_000, (lab.started + 160 - time.time()) * 1000))
    assert re.fullmatch(r"this machine \(.+\) · 1?\dm \d\ds left: then runs checkpoint and "
                        r"services stop", bar.inner_text()), bar.inner_text()
    bar.screenshot(path=SHOTS / "7-status-bar-warning.png")


def test_the_panel_and_status_bar_work_under_a_server_base_url(browser, tmp_path):
    """c.ServerApp.base_url set (as a site's proxy may need): every request of the extension
    follows it. A pod session with 10 minutes left: the status bar warns at once."""
    port, token = free_port(), "panel-test-token"
    env = {**os.environ, "AIFAB_BACKEND": "kubernetes", "AIFAB_POD_NAME": "jupyter-ada",
           "AIFAB_WALLTIME_END": str(int(time.time()) + 600),
           "AIFAB_STATE_DIR": str(tmp_path / "state"), "HOME": str(tmp_path)}
    base = f"http://127.0.0.1:{port}/site/base/"
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - the child holds it
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser",
         "--ip=127.0.0.1", f"--port={port}", f"--IdentityProvider.token={token}",
         "--ServerApp.base_url=/site/base/", f"--ServerApp.root_dir={tmp_path}",
         "--ServerApp.allow_root=True", "--ServerApp.port_retries=0"],
        env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = requests.get(base + "aifab/api/session", timeout=5,
                                 headers={"Authorization": f"token {token}"})
                if r.ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, \
                (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.2)
        assert r.json()["placement"] == "pod jupyter-ada"
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(f"{base}lab?token={token}")
        bar = page.locator(".aifab-StatusBar.aifab-mod-warn")
        bar.get_by_text(re.compile(r"^pod jupyter-ada · \d+m \d\ds left: then runs "
                                   r"checkpoint and services stop$")).wait_for(
            timeout=120_000)
        page.click("li[data-id=aifab-panel]")
        panel = page.locator(".aifab-Panel")
        panel.get_by_text("Session: pod jupyter-ada").wait_for(timeout=30_000)
        assert "no GPU: this session runs on CPUs" in panel.inner_text()
        page.close()
    finally:
        server.terminate()
        server.wait(30)
        log.close()


@pytest.mark.slurm
def test_a_queued_allocation_shows_slurms_reason_and_is_released_from_the_panel(
        browser, slurm, tmp_path):
    """On the real Slurm, its one node taken by a blocker: the allocation waits, and the panel
    says why (Slurm's reason, the position in the queue); Release ends the job."""
    from tests.test_allocations import ENV, SMALL, alloc_jobs

    blocker = slurm.run("sbatch", "--parsable", "-J", "blocker", "-p", "gh200", "--exclusive",
                        "-o", "/dev/null", "-t", "5", "--wrap", "sleep 300").stdout.strip()
    try:
        slurm.wait_for(lambda: any(r["job_id"] == blocker and r["state"] == "RUNNING"
                                   for r in slurm.squeue()), 30, what="the blocker running")
        with JupyterServer(tmp_path / "server", env=ENV) as server:
            r = server.request("POST", "aifab/api/allocations", json={**SMALL, "name": "waits"})
            assert r.status_code == 201, r.text
            job = r.json()["job_id"]
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"{server.url}lab?token={server.token}")
            page.click("li[data-id=aifab-panel]", timeout=120_000)
            card = page.locator(".aifab-Panel [data-allocation=waits]")
            card.get_by_text(re.compile(r"^queued: Resources · position 1 in the queue")).wait_for(
                timeout=60_000)
            assert f"Slurm job {job} · profile gh200 · 1 node(s) · 1 GPU/node" in card.inner_text()
            page.screenshot(path=SHOTS / "8-panel-allocation-queued.png")
            card.get_by_role("button", name="Release").click()
            page.locator(".jp-Dialog").get_by_role("button", name="Release").click()
            card.locator(".aifab-State-released").wait_for(timeout=60_000)
            assert card.get_by_role("button", name="Release").count() == 0
            slurm.wait_for(lambda: not alloc_jobs(slurm), 30, what="the allocation's job gone")
            page.close()
    finally:
        slurm.run("scancel", blocker, check=False)


@pytest.mark.gpu
def test_the_session_reports_memory_and_utilisation_of_its_visible_gpus_only(tmp_path):
    from tests.harness.jupyter import JupyterServer

    with JupyterServer(tmp_path, env={"CUDA_VISIBLE_DEVICES": "0"}) as server:
        info = server.get("aifab/api/session").json()
    assert info["visible_gpus"] == ["0"] and info["gpu_usage_note"] == "", info
    (gpu,) = info["gpu_usage"]
    assert gpu["id"] == "0" and gpu["memory_total_mib"] > 0 and 0 <= gpu["utilization"] <= 100


def _vllm_processes():
    return [p for p in psutil.process_iter(["cmdline"])
            if "vllm.entrypoints.openai.api_server" in (p.info["cmdline"] or [])]


def _vllm_server_of(served_name: str, hub, timeout: float = 60) -> psutil.Process:
    """The vLLM API server (the service's own process, not its engine child) of one model
    of this hub's session (not one of an earlier run that is still on its way out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p for p in _vllm_processes() if served_name in (p.info["cmdline"] or [])
                 and _cwd(p).startswith(str(hub.state))]
        if found:
            return found[0]
        time.sleep(0.5)
    raise AssertionError(f"no vLLM process serves {served_name!r}")


def _cwd(proc) -> str:
    try:
        return proc.cwd()
    except psutil.Error:
        return ""
