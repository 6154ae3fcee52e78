"""`make demo`'s hub, run from its own config as it is: a person logs in, presses Start on
the options form and lands in JupyterLab with the "Python 3 (aifab)" kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

from aifab.spawners.hub_client import HubSession, form_fields

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "demo" / "jupyterhub_config.py"


@pytest.fixture
def demo_hub(hub_factory, slurm, tmp_path):
    """The demo hub; with the Slurm fixture up, it also offers that cluster's partitions."""
    state = tmp_path / "demo-state"
    hub = hub_factory(config_file=DEMO_CONFIG, env={"AIFAB_DEMO_STATE": str(state)})
    hub.start()
    hub.password = (state / "password").read_text().strip()
    return hub


@pytest.mark.hub
@pytest.mark.slurm
def test_login_start_and_land_in_jupyterlab_with_the_aifab_kernel(demo_hub):
    person = HubSession(demo_hub.url)
    assert person.login("ada", demo_hub.password).status_code == 200

    html = person.options_form("ada")
    assert "This machine (CPU)" in html
    assert "Slurm partition gh200 (4 GPUs per node)" in html  # found by the demo
    fields = form_fields(html)
    assert fields["profile"] == "local-cpu"

    person.press_start("ada", fields)
    person.wait_ready("ada")

    lab = person.open("/user/ada/lab")
    assert lab.status_code == 200, lab.text[:500]
    assert "JupyterLab" in lab.text

    specs = person.open("/user/ada/api/kernelspecs").json()["kernelspecs"]
    assert specs["aifab"]["spec"]["display_name"] == "Python 3 (aifab)"

    session = person.open("/user/ada/aifab/api/session").json()
    assert session["backend"] == "local"
    assert session["profile"] == "local-cpu"
    assert session["source"] == "contract"

    r = demo_hub.api("DELETE", "/users/ada/server")
    assert r.status_code in (202, 204)
    demo_hub.wait_for_stopped("ada")


@pytest.mark.hub
def test_wrong_password_is_refused(demo_hub):
    person = HubSession(demo_hub.url)
    r = person.login("ada", "not-the-password")
    assert r.status_code == 403
    assert "Invalid username or password" in r.text


@pytest.mark.hub
def test_session_api_needs_jupyter_auth(demo_hub):
    person = HubSession(demo_hub.url)
    person.login("bob", demo_hub.password)
    person.press_start("bob", {"profile": "local-cpu"})
    person.wait_ready("bob")
    stranger = HubSession(demo_hub.url).open("/user/bob/aifab/api/session")
    # not logged in: refused (an API answers 403 rather than redirecting to a login page)
    assert stranger.status_code == 403
    assert "backend" not in stranger.text
