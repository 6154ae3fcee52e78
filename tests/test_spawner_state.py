"""Profiles change under a running hub: mistakes stop the hub at start, a removed profile
neither kills its running sessions nor gives a 500 later."""

from __future__ import annotations

import pytest
import yaml

from tests.harness.hub import HubError
from tests.slurm_hub import SITE_CONFIG, TEST_OVERRIDES, create_hub_user, proxied, session_job

pytestmark = [pytest.mark.hub]


def slurm_profile(slug: str) -> dict:
    return {"slug": slug, "display_name": slug, "backend": "slurm",
            "choices": {"gpus": {"default": 0, "min": 0, "max": 1},
                        "walltime": {"default": "00:20:00", "max": "01:00:00"}},
            "slurm": {"partition": "debug"}}


def test_a_mistake_in_the_profiles_stops_the_hub_at_start(hub_factory, tmp_path):
    bad = tmp_path / "profiles.yaml"
    profile = slurm_profile("gpu")
    profile["choices"]["gpus"] = {"default": 5, "min": 0, "max": 4}
    bad.write_text(yaml.safe_dump({"profiles": [profile]}))
    hub = hub_factory(config_file=SITE_CONFIG, extra_config=TEST_OVERRIDES,
                      env={"AIFAB_PROFILES": str(bad)})
    with pytest.raises(HubError, match="exited"):
        hub.start(timeout=60)
    assert "profile 'gpu', field 'choices.gpus': needs min <= default <= max" in hub.log_tail()


def test_a_two_field_walltime_in_a_profile_stops_the_hub_with_both_readings(hub_factory,
                                                                           tmp_path):
    """Slurm reads 01:30 as 1 min 30 s; a profile that meant 1 h 30 min must not silently
    change meaning."""
    bad = tmp_path / "profiles.yaml"
    profile = slurm_profile("gpu")
    profile["choices"]["walltime"] = {"default": "00:20:00", "max": "01:30"}
    bad.write_text(yaml.safe_dump({"profiles": [profile]}))
    hub = hub_factory(config_file=SITE_CONFIG, extra_config=TEST_OVERRIDES,
                      env={"AIFAB_PROFILES": str(bad)})
    with pytest.raises(HubError, match="exited"):
        hub.start(timeout=60)
    assert ("profile 'gpu', field 'choices.walltime.max': 01:30 is 1 min 30 s to Slurm "
            "(MM:SS); if you meant 1 h 30 min write 01:30:00") in hub.log_tail()


def test_a_batchspawner_setting_the_slurm_backend_ignores_stops_the_hub(hub_factory,
                                                                        tmp_path):
    """Set before use_placement_spawner() checks the configuration, the hub does not start."""
    config = tmp_path / "site_config.py"
    config.write_text("from aifab.spawners import use_placement_spawner\n"
                      "c = get_config()  # noqa\n"
                      "c.SlurmSpawner.req_partition = 'gh200'\n"
                      "use_placement_spawner(c, profiles_file="
                      f"{str(SITE_CONFIG.with_name('alps-profiles.yaml'))!r})\n")
    hub = hub_factory(config_file=config, extra_config=TEST_OVERRIDES)
    with pytest.raises(HubError, match="exited"):
        hub.start(timeout=60)
    assert ("c.SlurmSpawner.req_partition is set, but SlurmSessionSpawner does not use it: "
            "use the profile's `slurm: {partition: ...}` instead") in hub.log_tail()


def test_a_batchspawner_setting_made_after_the_profiles_is_refused_at_the_spawn(
        hub_factory, test_user):
    """Set after use_placement_spawner(), the setting is seen when the spawner is built:
    the spawn fails with the setting named, and nothing is submitted."""
    hub = hub_factory(config_file=SITE_CONFIG, extra_config=TEST_OVERRIDES
                      + "c.SlurmSpawner.exec_prefix = 'sudo -u {username}'\n")
    hub.start()
    user = test_user.pw_name
    create_hub_user(hub, user)
    r = hub.api("POST", f"/users/{user}/server", json={"profile": "gh200"})
    assert r.status_code == 500, r.text
    assert ("c.SlurmSpawner.exec_prefix is set, but SlurmSessionSpawner does not use it: use "
            "`SlurmSessionSpawner.submit_prefix`") in hub.log_tail(200)


@pytest.mark.slurm
def test_a_removed_profile_keeps_its_session_and_refuses_a_new_start_clearly(
        hub_factory, slurm, test_user, tmp_path):
    user = test_user.pw_name
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(yaml.safe_dump([slurm_profile("old"), slurm_profile("new")]))
    hub = hub_factory(config_file=SITE_CONFIG, extra_config=TEST_OVERRIDES,
                      env={"AIFAB_PROFILES": str(profiles)})
    hub.start()
    create_hub_user(hub, user)
    r = hub.api("POST", f"/users/{user}/server", json={"profile": "old"})
    assert r.status_code in (201, 202), r.text
    hub.wait_for_server(user, timeout=90)
    job = session_job(slurm, user)["job_id"]

    profiles.write_text(yaml.safe_dump([slurm_profile("new")]))
    hub.restart()
    assert proxied(hub, f"/user/{user}/api/status").status_code == 200
    assert session_job(slurm, user)["job_id"] == job
    assert "no longer configured" in hub.log_tail(200)

    hub.api("DELETE", f"/users/{user}/server")
    hub.wait_for_stopped(user)
    slurm.wait_for(lambda: session_job(slurm, user) is None, 15, what="job of removed profile")

    r = hub.api("POST", f"/users/{user}/server")  # no body: the saved options are reused
    assert r.status_code == 400
    assert r.json()["message"] == ("option 'profile': 'old' is not a profile you may use; "
                                   "allowed: new")
