from __future__ import annotations

import pytest

from aifab.gpus import map_visible_to_physical
from aifab.session import Session, SessionContractError, parse_gpu_list


def test_contract_round_trips_through_the_environment():
    s = Session(backend="slurm", profile="gh200", gpu_count=2, walltime_end=2_000_000_000,
                slurm_job_id="42")
    env = {**s.to_env(), "CUDA_VISIBLE_DEVICES": "2,3"}
    back = Session.from_env(env)
    assert (back.backend, back.profile, back.gpu_count, back.slurm_job_id) == \
        ("slurm", "gh200", 2, "42")
    assert back.visible_gpus == ("2", "3")
    assert back.walltime_end == 2_000_000_000
    assert back.source == "contract"
    assert back.walltime_left(now=1_999_999_000) == 1000
    assert back.walltime_left(now=2_100_000_000) == 0


def test_detected_from_slurm_when_no_contract():
    s = Session.from_env({"SLURM_JOB_ID": "7", "CUDA_VISIBLE_DEVICES": "0"})
    assert (s.backend, s.source, s.slurm_job_id, s.visible_gpus) == ("slurm", "detected", "7",
                                                                     ("0",))


def test_kubernetes_device_plugin_variable_is_used():
    s = Session.from_env({"KUBERNETES_SERVICE_HOST": "10.0.0.1",
                          "NVIDIA_VISIBLE_DEVICES": "GPU-1234abcd"})
    assert s.backend == "kubernetes"
    assert s.visible_gpus == ("GPU-1234abcd",)


def test_mismatch_between_granted_and_visible_is_noted():
    s = Session.from_env({"AIFAB_BACKEND": "slurm", "AIFAB_GPUS": "2",
                          "CUDA_VISIBLE_DEVICES": "0"})
    assert s.notes and "AIFAB_GPUS=2" in s.notes[0]


@pytest.mark.parametrize("env, message", [
    ({"AIFAB_BACKEND": "cloud"}, "allowed are local, slurm, kubernetes"),
    ({"AIFAB_BACKEND": "local", "AIFAB_GPUS": "two"}, "AIFAB_GPUS='two'"),
    ({"AIFAB_BACKEND": "local", "AIFAB_WALLTIME_END": "soon"}, "AIFAB_WALLTIME_END"),
    ({"CUDA_VISIBLE_DEVICES": "0;rm -rf /"}, "is not a GPU index"),
])
def test_bad_contract_values_are_named(env, message):
    with pytest.raises(SessionContractError, match=message.replace("(", r"\(")):
        Session.from_env(env)


def test_gpu_list_spellings():
    assert parse_gpu_list("") == ()
    assert parse_gpu_list("none") == ()
    assert parse_gpu_list("0, 1") == ("0", "1")
    assert parse_gpu_list("MIG-abc-1/2/3") == ("MIG-abc-1/2/3",)


DEVICES = [{"index": 0, "uuid": "GPU-aaaa"}, {"index": 1, "uuid": "GPU-bbbb"},
           {"index": 2, "uuid": "GPU-cccc"}, {"index": 3, "uuid": "GPU-dddd"}]


def test_visible_indices_and_uuids_map_to_physical_devices():
    assert [d["index"] for d in map_visible_to_physical(("2", "3"), DEVICES)] == [2, 3]
    assert [d["index"] for d in map_visible_to_physical(("GPU-bb", "GPU-aaaa"), DEVICES)] == \
        [1, 0]


def test_unknown_visible_gpu_is_an_error_naming_it():
    with pytest.raises(ValueError, match="'7' matches no device"):
        map_visible_to_physical(("7",), DEVICES)
