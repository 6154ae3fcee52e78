"""Pure logic of the spawner: profiles, options, form and batch script."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aifab.spawners import (
    OptionsError,
    ProfileConfigError,
    load_profiles,
    load_profiles_file,
    options_from_form,
    validate_options,
)
from aifab.spawners.form import WALLTIME_PATTERN, render_form
from aifab.spawners.slurm import render_batch_script

REPO = Path(__file__).resolve().parent.parent
ALPS = load_profiles(load_profiles_file(REPO / "docs/examples/alps-profiles.yaml"))
GH200 = next(p for p in ALPS if p.slug == "gh200")


# ---------------------------------------------------------------- admin mistakes
BASE = {"slug": "gpu", "backend": "slurm", "choices": {"gpus": {"default": 1, "min": 0,
                                                                 "max": 4}}}


@pytest.mark.parametrize("change, message", [
    ({"slug": "GPU Node"}, "field 'slug'"),
    ({"backend": "pbs"}, "field 'backend': 'pbs' is not one of local, slurm, kubernetes"),
    ({"colour": "red"}, "field 'colour': unknown field"),
    ({"choices": {"gpus": {"default": 5, "min": 0, "max": 4}}}, "min <= default <= max"),
    ({"choices": {"gpus": {"default": -1, "min": -1, "max": 4}}}, "choices.gpus.default"),
    ({"choices": {"walltime": {"default": "1 hour"}}}, "field 'choices.walltime.default'"),
    # Slurm reads A:B as MM:SS; an older profile meant HH:MM: refused, both readings shown
    ({"choices": {"walltime": {"max": "01:30"}}},
     "01:30 is 1 min 30 s to Slurm (MM:SS); if you meant 1 h 30 min write 01:30:00"),
    # YAML reads an unquoted 12:00:00 as the base-60 number 43200
    ({"choices": {"walltime": {"max": 43200}}}, "as a quoted string"),
    ({"choices": {"ram": 4}}, "field 'choices.ram': unknown choice"),
    ({"slurm": {"partition": "gh200\n#SBATCH --uid=0"}}, "field 'slurm.partition'"),
    ({"slurm": {"prologue": "#SBATCH --exclusive"}}, "field 'slurm.prologue'"),
    ({"slurm": {"qos": "high priority"}}, "field 'slurm.qos'"),
    ({"kubernetes": {"namespace": "x"}}, "field 'kubernetes': set, but the profile's backend"),
    ({"choices": {"image": {"default": "a", "allowed": {"b": "img:1"}}}},
     "field 'choices.image.default'"),
    ({"model_cache": "models/shared"}, "field 'model_cache': an absolute path"),
    ({"environment": {"AIFAB_BACKEND": "local"}}, "field 'environment.AIFAB_BACKEND'"),
    ({"environment": {"lower": "x"}}, "field 'environment.lower'"),
    ({"environment": {"X": "a\nb"}}, "field 'environment.X': one line of text"),
])
def test_an_admin_mistake_names_the_profile_and_field(change, message):
    with pytest.raises(ProfileConfigError, match="profile 'gpu'" if "slug" not in change
                       else "profile"):
        load_profiles([{**BASE, **change}])
    with pytest.raises(ProfileConfigError) as exc:
        load_profiles([{**BASE, **change}])
    assert message in str(exc.value)


def test_duplicate_slugs_and_two_defaults_are_refused():
    with pytest.raises(ProfileConfigError, match="slug used twice"):
        load_profiles([BASE, BASE])
    with pytest.raises(ProfileConfigError, match="more than one has default"):
        load_profiles([{**BASE, "default": True}, {**BASE, "slug": "b", "default": True}])


def test_a_kubernetes_profile_needs_an_image():
    with pytest.raises(ProfileConfigError, match="'k'.*choices.image"):
        load_profiles([{"slug": "k", "backend": "kubernetes"}])


def test_profiles_file_errors(tmp_path):
    with pytest.raises(ProfileConfigError, match="not valid YAML"):
        (tmp_path / "p.yaml").write_text("profiles: [")
        load_profiles_file(tmp_path / "p.yaml")
    with pytest.raises(ProfileConfigError, match="No such file"):
        load_profiles_file(tmp_path / "missing.yaml")


def test_site_example_loads():
    assert [p.slug for p in ALPS] == ["gh200", "workshop", "k8s-cpu", "k8s-gpu"]
    assert GH200.choices.walltime.max == 12 * 3600
    assert GH200.slurm.gres_type == "gh200"


# ---------------------------------------------------------------- user options
def test_defaults_come_from_the_profile():
    p = validate_options({}, ALPS, "ada")
    assert (p.profile, p.gpus, p.cpus, p.memory_gb, p.walltime_s, p.image) == \
        ("gh200", 1, 16, 64, 3600, "pytorch")
    assert p.image_ref == "pytorch/v2.6.0:v1"


def test_form_strings_and_rest_numbers_mean_the_same():
    a = validate_options({"profile": "gh200", "gpus": "2", "walltime": "90"}, ALPS, "ada")
    b = validate_options({"profile": "gh200", "gpus": 2, "walltime": "01:30:00"}, ALPS, "ada")
    assert a == b and a.walltime_s == 5400


def test_group_profiles_are_visible_to_members_and_admins_only():
    with pytest.raises(OptionsError, match="not a profile you may use; allowed: gh200, k8s-cpu"):
        validate_options({"profile": "workshop"}, ALPS, "ada")
    assert validate_options({"profile": "workshop"}, ALPS, "ada", ["workshop"]).gpus == 1
    assert validate_options({"profile": "k8s-gpu"}, ALPS, "root", admin=True).gpus == 1


@pytest.mark.parametrize("options, field", [
    ({"gpus": 9}, "gpus"), ({"walltime": "13:00:00"}, "walltime"),
    ({"walltime": "01:00:00\n#SBATCH --uid=0"}, "walltime"), ({"image": "ubuntu"}, "image"),
    ({"prologue": "rm -rf ~"}, "prologue"), ({"profile": None}, "profile"),
    ({"gpus": True}, "gpus"), ({"cpus": 1.5}, "cpus"),
])
def test_each_bad_option_is_named(options, field):
    with pytest.raises(OptionsError) as exc:
        validate_options(options, ALPS, "ada")
    assert exc.value.field == field
    assert "allow" in str(exc.value) or "offers no" in str(exc.value)


def test_slurm_profiles_need_a_plain_unix_user_name():
    with pytest.raises(OptionsError, match="cannot be used as a Unix account"):
        validate_options({"profile": "gh200"}, ALPS, "eve;id")
    # Kubernetes pods are named by kubespawner's own escaping: any hub name will do
    assert validate_options({"profile": "k8s-cpu"}, ALPS, "eve;id").backend == "kubernetes"


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 4), st.integers(1, 288), st.integers(4, 460), st.integers(1, 720))
def test_everything_inside_the_bounds_is_accepted(gpus, cpus, mem, minutes):
    p = validate_options({"profile": "gh200", "gpus": gpus, "cpus": cpus, "memory_gb": mem,
                          "walltime": minutes}, ALPS, "ada")
    assert (p.gpus, p.cpus, p.memory_gb, p.walltime_s) == (gpus, cpus, mem, minutes * 60)


@pytest.mark.parametrize("walltime, seconds", [
    ("90", 5400), (90, 5400), ("01:30:00", 5400), ("1-12", 129600), ("0-01:30", 5400),
    ("1-00:00:00", 86400),
])
def test_a_user_walltime_means_what_it_means_to_slurm(walltime, seconds):
    alps = load_profiles([{**BASE, "choices": {"walltime": {"max": "2-00:00:00"}}}])
    assert validate_options({"walltime": walltime}, alps, "ada").walltime_s == seconds


def test_a_two_field_user_walltime_is_refused_with_both_readings():
    with pytest.raises(OptionsError) as exc:
        validate_options({"walltime": "01:30"}, ALPS, "ada")
    assert exc.value.field == "walltime"
    assert "1 min 30 s to Slurm" in str(exc.value) and "write 01:30:00" in str(exc.value)


# ---------------------------------------------------------------- form
def test_form_works_without_javascript_and_shows_the_limits():
    html = render_form([p for p in ALPS if p.visible_to("ada", [], False)])
    assert "<script" not in html
    assert 'name="profile" value="gh200" checked' in html
    assert 'name="gh200--gpus" value="1" min="0" max="4"' in html
    assert "up to 12:00:00" in html and "Workshop" not in html
    assert f'name="gh200--walltime" value="01:00:00" pattern="{WALLTIME_PATTERN}"' in html
    fields = {"profile": ["k8s-cpu"], "k8s-cpu--cpus": ["4"], "gh200--gpus": ["3"]}
    assert options_from_form(fields) == {"profile": "k8s-cpu", "cpus": "4"}


def test_form_escapes_what_it_shows():
    (p,) = load_profiles([{"slug": "x", "backend": "local",
                           "display_name": "<script>alert(1)</script>"}])
    assert "<script>" not in render_form([p])


def test_a_repeated_form_field_is_refused():
    with pytest.raises(OptionsError, match="given more than once"):
        options_from_form({"profile": ["gh200", "k8s-cpu"]})


# ---------------------------------------------------------------- batch script
def test_batch_script_is_rendered_from_the_placement_only():
    p = validate_options({"profile": "gh200", "gpus": 2, "walltime": "02:00:00"}, ALPS, "ada")
    script = render_batch_script(p, GH200.slurm, job_name="aifab-ada", output="/home/ada/x.log",
                                 workdir="/home/ada", export=["JUPYTERHUB_API_TOKEN", "PATH"],
                                 command=["/opt/bin/batchspawner-singleuser",
                                          "jupyterhub-singleuser", "--arg=a b"])
    lines = script.splitlines()
    assert "#SBATCH --gres=gpu:gh200:2" in lines
    assert "#SBATCH --time=02:00:00" in lines
    assert "#SBATCH --partition=gh200" in lines and "#SBATCH --account=a-aifab" in lines
    assert "#SBATCH --export=JUPYTERHUB_API_TOKEN,PATH" in lines
    assert lines[-1] == "exec /opt/bin/batchspawner-singleuser jupyterhub-singleuser '--arg=a b'"
    assert "export AIFAB_WALLTIME_END=$(( $(date +%s) + 7200 ))" in lines
    assert "#SBATCH --signal=B:USR1@300" in lines
    assert [line for line in lines if line.startswith("#SBATCH")] == [
        "#SBATCH --job-name=aifab-ada",
        "#SBATCH --output=/home/ada/x.log",
        "#SBATCH --chdir=/home/ada",
        "#SBATCH --export=JUPYTERHUB_API_TOKEN,PATH",
        "#SBATCH --time=02:00:00",
        "#SBATCH --cpus-per-task=16",
        "#SBATCH --mem=64G",
        "#SBATCH --comment=aifab-session",
        "#SBATCH --signal=B:USR1@300",
        "#SBATCH --gres=gpu:gh200:2",
        "#SBATCH --partition=gh200",
        "#SBATCH --account=a-aifab",
    ]
    assert "ulimit -c 0" in lines
    # where the session runs, for the jobs it submits itself (dask workers)
    assert "export AIFAB_SLURM_PARTITION=gh200" in lines
    assert "export AIFAB_SLURM_ACCOUNT=a-aifab" in lines


def test_a_workshop_profile_gives_its_sessions_the_shared_model_cache():
    workshop = load_profiles([{**BASE, "model_cache": "/store/models",
                               "environment": {"AIFAB_DASK_INTERFACE": "hsn0"}}])[0]
    assert workshop.session_environment() == {
        "AIFAB_MODEL_CACHE": "/store/models", "HF_HUB_CACHE": "/store/models",
        "HF_HUB_OFFLINE": "1", "AIFAB_DASK_INTERFACE": "hsn0"}


def test_batch_script_refuses_an_env_name_that_is_not_one():
    p = validate_options({}, ALPS, "ada")
    with pytest.raises(ValueError, match="cannot be exported"):
        render_batch_script(p, GH200.slurm, job_name="j", output="o", workdir="w",
                            export=["A,B"], command=["x"])


# ---------------------------------------------------------------- discovery (demo)
def test_profiles_from_sinfo_output():
    from aifab.spawners.discover import profiles_from_sinfo

    text = ("debug|(null)|8|16000|infinite\n"
            "gh200|gpu:gh200:4|288|470000|1-00:00:00\n"
            "gh200|gpu:gh200:4|288|470000|1-00:00:00\n"  # a second node line
            "bad name|gpu:2|8|1000|1:00:00\n")
    profiles = load_profiles(profiles_from_sinfo(text))
    assert [p.slug for p in profiles] == ["slurm-debug", "slurm-gh200"]
    gh = profiles[1]
    assert (gh.choices.gpus.max, gh.slurm.gres_type, gh.slurm.partition) == (4, "gh200", "gh200")
    assert gh.choices.walltime.max == 12 * 3600 and gh.choices.memory_gb.max == 458
    assert profiles[0].choices.gpus.max == 0
