"""The newcomer's path in a real browser: Playwright drives Debian's chromium (headless) through
`make demo`'s hub: log in with the class password, choose a profile in the options form,
start, land in JupyterLab, open tutorial 4, run its cells, see the %serve widget reach "ready"
and the model's answer in the page; then `llm.stop()` turns that widget to "stopped", and a
second served model whose vLLM is killed turns its widget to "failed" with vLLM's last log
lines. Screenshots of the form, the widgets and the answer go to test-artifacts/browser/."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.harness.chromium import launch

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "demo" / "jupyterhub_config.py"
SHOTS = REPO / "test-artifacts" / "browser"
USER = "newcomer"

pytestmark = [pytest.mark.browser, pytest.mark.hub, pytest.mark.vllm]


@pytest.fixture
def demo_hub(hub_factory, slurm, tiny_model, tmp_path):
    """The demo hub as `make demo` runs it: its models folder holds the tiny model."""
    state = tmp_path / "demo-state"
    (state / "models").mkdir(parents=True)
    (state / "models" / "tiny-llama").symlink_to(tiny_model)
    hub = hub_factory(config_file=DEMO_CONFIG, env={"AIFAB_DEMO_STATE": str(state)})
    hub.start()
    hub.password = (state / "password").read_text().strip()
    yield hub
    # Stop as a person does (Stop My Server): the session's vLLM must stop with it
    hub.api("DELETE", f"/users/{USER}/server")
    hub.wait_for_stopped(USER, timeout=60)
    left = [p.pid for p in psutil.process_iter(["cmdline"])
            if "vllm.entrypoints" in " ".join(p.info["cmdline"] or [])
            and _cwd(p).startswith(str(state))]
    assert not left, f"the session's vLLM outlived its server: pids {left}"


def _cwd(proc) -> str:
    try:
        return proc.cwd()
    except psutil.Error:
        return ""


@pytest.fixture
def page():
    with launch(SHOTS) as browser:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.set_default_timeout(60_000)
        yield page
        context.close()


def test_newcomer_logs_in_starts_and_chats_with_the_served_model(demo_hub, page):
    try:
        _walk_the_newcomer_path(demo_hub, page)
    except Exception:
        page.screenshot(path=SHOTS / "failure.png", full_page=True)  # what the person saw
        raise


def _walk_the_newcomer_path(demo_hub, page) -> None:
    hub = demo_hub.url.rstrip("/")
    page.goto(f"{hub}/hub/login")
    page.fill("input[name=username]", USER)
    page.fill("input[name=password]", demo_hub.password)
    page.click("input[type=submit], button[type=submit]")

    # the options form: the local profile and the Slurm partitions the demo found
    page.wait_for_selector("input[name=profile][value=local-cpu]")
    assert page.locator("input[name=profile]").count() > 1
    page.check("input[name=profile][value=local-cpu]")
    page.screenshot(path=SHOTS / "1-options-form.png", full_page=True)
    page.click("#spawn_form input[type=submit], #spawn_form button[type=submit]")

    # JupyterLab, in the tutorials
    page.wait_for_url(f"**/user/{USER}/lab**", timeout=120_000)
    page.wait_for_selector(".jp-Notebook", timeout=120_000)
    page.goto(f"{hub}/user/{USER}/lab/tree/tutorials/04-serve-and-chat.ipynb")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
    page.get_by_text("Python 3 (aifab) | Idle").wait_for(timeout=120_000)  # the status bar
    news = page.get_by_role("button", name="No", exact=True)  # JupyterLab asks about news
    if news.count():
        news.first.click()
    page.click(".jp-Notebook .jp-Cell >> nth=0")
    page.get_by_role("menuitem", name="Run", exact=True).click()  # JupyterLab's menu bar
    page.click("li[data-command=\"runmenu:run-all\"]")

    # the %serve widget: start-up phases, then ready (training the adapter comes first);
    # an error in any cell ends the wait at once, with its text
    ready = page.locator("text=/ready after \\d+s/")
    error = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    ready.or_(error).first.wait_for(timeout=400_000)
    assert error.count() == 0, error.first.inner_text()[-3000:]
    ready.scroll_into_view_if_needed()
    assert page.locator("text=vLLM: chat").count() == 1
    page.screenshot(path=SHOTS / "2-serve-widget-ready.png")

    answer = page.locator("text=answer: pong")
    answer.wait_for(timeout=60_000)
    answer.scroll_into_view_if_needed()
    page.screenshot(path=SHOTS / "3-chat-answer.png")
    page.locator('text=/"content":"pong"/').wait_for(timeout=120_000)  # and through curl
    assert error.count() == 0, error.first.inner_text()[-3000:]

    # the widget follows the service to its end: a stop from the handle turns it to stopped
    serve_output = page.locator(".jp-Cell", has_text="vLLM: chat").locator(".jp-Cell-outputArea")
    _run_new_cell(page, "llm.stop()")
    serve_output.get_by_text("stopped", exact=True).wait_for(timeout=60_000)
    assert serve_output.get_by_role("button", name="Stop").is_disabled()
    serve_output.scroll_into_view_if_needed()
    page.screenshot(path=SHOTS / "4-serve-widget-stopped.png")

    # and a vLLM that dies turns its widget to failed, with vLLM's own last lines
    _run_new_cell(page, "crash = %serve $MODEL --name crash --max-model-len 256")
    crash_output = page.locator(".jp-Cell", has_text="vLLM: crash").locator(".jp-Cell-outputArea")
    crash_output.get_by_text(re.compile(r"ready after \d+s")).wait_for(timeout=400_000)
    server = _vllm_server_of(demo_hub, "crash")
    log_lines = [line for line in _service_log(server).splitlines() if line.strip()]
    server.send_signal(signal.SIGKILL)
    crash_output.get_by_text(re.compile(r"^failed: exited")).wait_for(timeout=60_000)
    assert crash_output.get_by_role("button", name="Stop").is_disabled()
    shown = crash_output.inner_text()
    assert log_lines and log_lines[-1].strip() in shown, (log_lines[-3:], shown[-2000:])
    crash_output.scroll_into_view_if_needed()
    page.screenshot(path=SHOTS / "5-serve-widget-failed.png")
    assert error.count() == 0, error.first.inner_text()[-3000:]


def _run_new_cell(page, code: str) -> None:
    """Add a cell at the end of the notebook and run it, as a person does with the keyboard."""
    page.locator(".jp-Notebook .jp-Cell").last.click()
    page.keyboard.press("Escape")  # command mode
    page.keyboard.press("b")  # a new cell below, selected
    page.keyboard.press("Enter")  # edit it
    page.keyboard.insert_text(code)  # as typed, without the editor closing brackets
    page.keyboard.press("Shift+Enter")


def _vllm_server_of(hub, served_name: str, timeout: float = 30) -> psutil.Process:
    """The vLLM API server (the service's own process, not its engine child) of one model."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p for p in psutil.process_iter(["cmdline"])
                 if "vllm.entrypoints.openai.api_server" in (p.info["cmdline"] or [])
                 and served_name in (p.info["cmdline"] or [])]
        if found:
            return found[0]
        time.sleep(0.5)
    raise AssertionError(f"no vLLM process serves {served_name!r}")


def _service_log(server: psutil.Process) -> str:
    """The service's log, in its folder (the process's working directory)."""
    return (Path(server.cwd()) / "service.log").read_text(errors="replace")
