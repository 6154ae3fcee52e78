"""Bad user options through the real hub's REST API: every one is refused with HTTP 400
naming the field and what is allowed, and nothing is ever submitted to Slurm."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.slurm_hub import (
    SITE_CONFIG,
    TEST_OVERRIDES,
    create_hub_user,
    ensure_unix_user,
    session_job,
)

pytestmark = [pytest.mark.slurm, pytest.mark.hub]

VISIBLE = {"gh200", "k8s-cpu"}  # what aifabtest (no groups) may use in the site example
INJECT = st.text(max_size=20).map(lambda s: s + "\n#SBATCH --uid=0\n")

unknown_profile = st.one_of(
    st.text(max_size=30).filter(lambda s: s not in VISIBLE),
    st.sampled_from(["workshop", "k8s-gpu", "GH200", "gh200 ", "gh200\n#SBATCH --uid=0"]),
    st.integers(), st.none(), st.lists(st.just("gh200"), max_size=2),
).map(lambda v: {"profile": v})


def out_of(lo: int, hi: int):
    return st.one_of(st.integers(max_value=lo - 1), st.integers(min_value=hi + 1),
                     st.integers(min_value=hi + 1, max_value=10**6).map(str))


not_a_number = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                         st.none(), INJECT, st.lists(st.integers(0, 2), max_size=2),
                         st.text(alphabet="abc;$()`|&", min_size=1, max_size=10))
bad_number = st.one_of(
    st.tuples(st.just("gpus"), st.one_of(out_of(0, 4), not_a_number)),
    st.tuples(st.just("cpus"), st.one_of(out_of(1, 288), not_a_number)),
    st.tuples(st.just("memory_gb"), st.one_of(out_of(4, 460), not_a_number)),
).map(lambda kv: {"profile": "gh200", kv[0]: kv[1]})

bad_walltime = st.one_of(
    st.integers(min_value=721, max_value=10**7),  # minutes, over the 12 h maximum
    st.integers(max_value=0),
    st.sampled_from(["12:00:01", "1-00:00:00", "99:00:00", "00:00:30"]),
    INJECT, st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
).map(lambda v: {"profile": "gh200", "walltime": v})

bad_image = st.one_of(
    st.text(max_size=30).filter(lambda s: s not in ("pytorch", "prgenv-gnu")), INJECT,
    st.integers(),
).map(lambda v: {"profile": "gh200", "image": v})

unknown_key = st.tuples(
    st.one_of(st.text(min_size=1, max_size=20),
              st.sampled_from(["prologue", "cmd", "batch_script", "req_options", "port"])).filter(
        lambda k: k not in ("profile", "gpus", "cpus", "memory_gb", "walltime", "image")),
    st.one_of(st.text(max_size=20), st.integers(), INJECT),
).map(lambda kv: {"profile": "gh200", kv[0]: kv[1]})

# a body that is JSON but not an object (top-level null is "no options": JupyterHub's own)
not_an_object = st.one_of(
    st.lists(st.one_of(st.integers(), st.text(max_size=5), st.none()), max_size=3),
    st.text(max_size=20), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(), st.just([{"profile": "gh200"}]),
)

BAD_OPTIONS = st.one_of(unknown_profile, bad_number, bad_walltime, bad_image, unknown_key,
                        not_an_object)


def submitted_job_id(slurm) -> int:
    """A probe job's id: ids are sequential, so two probes bracket every submission."""
    return int(slurm.run("sbatch", "--parsable", "-p", "debug", "-o", "/dev/null",
                         "--wrap", "true").stdout.strip().split(";")[0])


def test_a_thousand_bad_payloads_are_refused_and_nothing_is_submitted(slurm_hub, slurm,
                                                                      test_user):
    user = test_user.pw_name
    seen = {"n": 0}
    before = submitted_job_id(slurm)

    @settings(max_examples=1000, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(BAD_OPTIONS)
    def refused(options):
        r = slurm_hub.api("POST", f"/users/{user}/server", json=options)
        assert r.status_code == 400, (options, r.status_code, r.text)
        message = r.json()["message"]
        assert message.startswith("option "), (options, message)
        assert "allow" in message or "offers no" in message, (options, message)
        seen["n"] += 1

    refused()
    after = submitted_job_id(slurm)
    assert seen["n"] >= 1000
    assert after == before + 1, f"{after - before - 1} job(s) were submitted"
    assert not [r for r in slurm.squeue() if r["name"].startswith("aifab-")]


def test_shell_characters_in_a_user_name_are_refused_before_slurm(slurm_hub, slurm):
    name = "eve;$(id)"
    create_hub_user(slurm_hub, name)
    before = submitted_job_id(slurm)
    r = slurm_hub.api("POST", f"/users/{quote(name, safe='')}/server", json={"profile": "gh200"})
    assert r.status_code == 400
    assert "cannot be used as a Unix account" in r.json()["message"]
    assert submitted_job_id(slurm) == before + 1


def test_a_group_profile_is_offered_and_allowed_only_to_its_members(slurm_hub, slurm):
    name = "aifabtest2"
    ensure_unix_user(name)
    create_hub_user(slurm_hub, name)
    r = slurm_hub.api("POST", f"/users/{name}/server", json={"profile": "workshop"})
    assert r.status_code == 400
    assert "'workshop' is not a profile you may use; allowed: gh200, k8s-cpu" in \
        r.json()["message"]

    create_hub_user(slurm_hub, name, groups=("workshop",))
    slurm.run("scontrol", "create", "reservation", "ReservationName=workshop",
              "StartTime=now", "Duration=30", f"Users={name}", "Nodes=localhost",
              "Flags=IGNORE_JOBS")
    try:
        r = slurm_hub.api("POST", f"/users/{name}/server", json={"profile": "workshop"})
        assert r.status_code in (201, 202), r.text
        slurm_hub.wait_for_server(name, timeout=90)
        fields = slurm.run("squeue", "-h", "-u", name, "-o", "%v %P %b").stdout.split()
        assert fields[:2] == ["workshop", "gh200"]
        assert fields[2].endswith("gpu:gh200:1"), fields
        slurm_hub.api("DELETE", f"/users/{name}/server")
        slurm_hub.wait_for_stopped(name)
    finally:
        slurm.wait_for(lambda: not slurm.squeue("-u", name), 20, what="workshop job gone")
        slurm.run("scontrol", "delete", "ReservationName=workshop", check=False)


# Raw bodies: every shape JSON allows in the wrong place. Top-level null is no body at all.
NOT_AN_OBJECT = ["[]", "[1]", '["gh200"]', '[{"profile": "gh200"}]', '"gh200"', '""', "0",
                 "42", "-1", "1.5", "1e400", "true", "false"]
NULL_OR_WRONG_TYPE_INSIDE = [
    '{"profile": null}', '{"profile": "gh200", "gpus": null}', '{"cpus": null}',
    '{"memory_gb": null}', '{"walltime": null}', '{"image": null}', '{"profile": ["gh200"]}',
    '{"profile": {"slug": "gh200"}}', '{"gpus": {"n": 1}}', '{"gpus": [1]}', '{"gpus": 1.0}',
    '{"walltime": ["01:00:00"]}', '{"walltime": {"max": "01:00:00"}}', '{"image": ["pytorch"]}',
    '{"gpus": 1e400}', '{"gpus": 100000000000000000000000000000}', '{"null": null}',
]


def post_raw(hub, path: str, body: str):
    return hub.api("POST", path, data=body.encode(), headers={"Content-Type": "application/json"})


def assert_refused(r, body: str) -> str:
    assert r.status_code == 400, (body, r.status_code, r.text)
    message = r.json()["message"]
    assert message.startswith("option "), (body, message)
    assert "allow" in message, (body, message)
    return message


def test_every_shape_of_bad_body_is_a_400_that_says_what_is_expected(slurm_hub, slurm,
                                                                      test_user):
    user = test_user.pw_name
    before = submitted_job_id(slurm)
    for body in NOT_AN_OBJECT:
        message = assert_refused(post_raw(slurm_hub, f"/users/{user}/server", body), body)
        assert "the request body must be a JSON object such as" in message, (body, message)
        assert "allowed keys: profile, gpus, cpus, memory_gb, walltime, image" in message
    for body in NULL_OR_WRONG_TYPE_INSIDE:
        assert_refused(post_raw(slurm_hub, f"/users/{user}/server", body), body)
    # Slurm reads 01:30 as 1 min 30 s: refused with both readings
    message = assert_refused(post_raw(slurm_hub, f"/users/{user}/server",
                                      '{"walltime": "01:30"}'), "01:30")
    assert "1 min 30 s to Slurm" in message and "write 01:30:00" in message
    # not JSON at all: the hub's own 400, before any hook
    r = post_raw(slurm_hub, f"/users/{user}/server", "{")
    assert (r.status_code, r.json()["message"]) == (400, "Invalid JSON in body of request")
    assert submitted_job_id(slurm) == before + 1, "a refused body was submitted"

    # the last refused body was not kept as the server's default options: a start without
    # a body gets the profile's defaults (gh200: 1 GPU, 16 CPUs)
    r = slurm_hub.api("POST", f"/users/{user}/server")
    assert r.status_code in (201, 202), r.text
    try:
        slurm_hub.wait_for_server(user, timeout=90)
        fields = slurm.run("squeue", "-h", "-u", user, "-o", "%P %C %b").stdout.split()
        assert fields[:2] == ["gh200", "16"] and fields[2].endswith("gpu:gh200:1"), fields
    finally:
        slurm_hub.api("DELETE", f"/users/{user}/server")
        slurm_hub.wait_for_stopped(user, timeout=60)
        slurm.wait_for(lambda: session_job(slurm, user) is None, 20, what="session job gone")


def test_a_named_servers_bad_body_is_a_400_too(hub_factory, slurm, test_user):
    hub = hub_factory(config_file=SITE_CONFIG,
                      extra_config=TEST_OVERRIDES + "c.JupyterHub.allow_named_servers = True\n")
    hub.start()
    user = test_user.pw_name
    create_hub_user(hub, user)
    before = submitted_job_id(slurm)
    for body in [*NOT_AN_OBJECT, *NULL_OR_WRONG_TYPE_INSIDE,
                 json.dumps({"profile": "gh200", "prologue": "id"})]:
        assert_refused(post_raw(hub, f"/users/{user}/servers/lab", body), body)
    assert submitted_job_id(slurm) == before + 1, "a refused body was submitted"
