"""Allocation requests against the hub's allowances, and Slurm's node lists (pure)."""

from __future__ import annotations

import pytest

from aifab.allocation import (
    Allowance,
    allowances_from_env,
    allowances_to_env,
    check_request,
)
from aifab.api import BadRequest
from aifab.extension.allocations import expand_nodes
from aifab.spawners.profiles import load_profiles

GH200 = Allowance(profile="gh200", partition="gh200", account="a-aifab", gres_type="gh200",
                  max_nodes=4, max_gpus=4, max_cpus=288, max_memory_gb=460,
                  max_walltime_s=4 * 3600, default_walltime_s=3600)


def test_a_request_becomes_sbatch_arguments_of_its_profile():
    req = check_request({"profile": "gh200", "nodes": 2, "gpus": 4, "cpus": 64,
                         "memory_gb": 200, "walltime": "02:00:00", "name": "big"}, [GH200])
    assert req.sbatch_args() == [
        "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=64", "--mem=200G",
        "--time=02:00:00", "--gres=gpu:gh200:4", "--partition=gh200", "--account=a-aifab"]
    assert req.to_dict()["walltime"] == "02:00:00"


def test_defaults_come_from_the_profile():
    req = check_request({}, [GH200])
    assert (req.name, req.nodes, req.gpus, req.walltime_s) == ("alloc", 1, 1, 3600)


@pytest.mark.parametrize("raw, message", [
    ({"nodes": 5}, "nodes=5: this profile allows 1 to 4 nodes"),
    ({"gpus": -1}, "gpus=-1: this profile allows 0 to 4 GPUs per node"),
    ({"gpus": True}, "gpus: a whole number of GPUs per node, got True"),
    ({"walltime": "05:00:00"}, "walltime 05:00:00: profile 'gh200' allows 1 minute to 04:00:00"),
    ({"walltime": "00:30"}, "walltime 00:00:30: profile 'gh200' allows 1 minute"),
    ({"account": "other"}, "account 'other': profile 'gh200' allows a-aifab"),
    ({"partition": "debug"}, "'partition' is not a field of an allocation"),
    ({"name": "x" * 50}, "name 'xxxxxxxx"),
])
def test_what_the_profile_does_not_allow_is_refused_by_name(raw, message):
    with pytest.raises(BadRequest) as exc:
        check_request(raw, [GH200])
    assert message in str(exc.value)


def test_allowances_travel_through_the_environment_and_are_checked_there():
    assert allowances_from_env(allowances_to_env([GH200])) == [GH200]
    assert allowances_from_env("") == []
    with pytest.raises(ValueError, match="partition='a;b'"):
        allowances_from_env('[{"profile": "x", "partition": "a;b"}]')
    with pytest.raises(ValueError, match="not a list of allowances"):
        allowances_from_env('[{"profile": "x", "argv": "sleep"}]')


def test_a_slurm_profile_gives_its_allowance():
    [p] = load_profiles([{
        "slug": "gh200", "display_name": "GH200", "backend": "slurm",
        "choices": {"gpus": {"default": 1, "min": 0, "max": 4},
                    "nodes": {"default": 1, "min": 1, "max": 8},
                    "walltime": {"default": "01:00:00", "max": "12:00:00"}},
        "slurm": {"partition": "gh200", "gres_type": "gh200"}}])
    a = p.allowance()
    assert (a.max_nodes, a.max_gpus, a.max_walltime_s, a.partition) == (8, 4, 43200, "gh200")


@pytest.mark.parametrize("nodelist, hosts", [
    ("nid001", ["nid001"]),
    ("nid[001-003]", ["nid001", "nid002", "nid003"]),
    ("nid[001,007],gpu7", ["nid001", "nid007", "gpu7"]),
    ("(null)", []),
])
def test_slurm_node_lists_are_expanded(nodelist, hosts):
    assert expand_nodes(nodelist) == hosts


# ------------------------------------------------------------------ work inside an allocation
def test_a_step_gets_the_allocations_size_and_contract_never_the_servers_tokens():
    from types import SimpleNamespace

    from aifab.extension import steps

    alloc = SimpleNamespace(job_id="42", nodes=["nid001", "nid002"], started_at=1000.0,
                            request={"profile": "gh200", "gpus": 4, "cpus": 72,
                                     "walltime": "01:00:00", "partition": "normal"})
    assert steps.step_argv(alloc, "aifab-run-x", ["python", "-V"]) == [
        "srun", "--overlap", "--jobid=42", "-N1", "-n1", "--ntasks-per-node=1",
        "--kill-on-bad-exit=1", "--cpus-per-task=72", "--mem=0", "--nodelist=nid001",
        "--job-name=aifab-run-x", "--quiet", "python", "-V"]
    # a task on each of the first N nodes
    assert steps.step_argv(alloc, "aifab-run-y", ["true"], nodes=2)[3:8] == [
        "-N2", "-n2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=72"]
    assert "--nodelist=nid001,nid002" in steps.step_argv(alloc, "y", ["true"], nodes=2)
    server = {"PATH": "/usr/bin", "HF_HOME": "/models", "SLURM_CONF": "/etc/slurm.conf",
              "JUPYTERHUB_API_TOKEN": "t", "AIFAB_SERVER_TOKEN": "t", "SLURM_JOB_ID": "7",
              "CUDA_VISIBLE_DEVICES": "0", "AIFAB_BACKEND": "local", "JUPYTER_TOKEN": "t",
              "HF_TOKEN": "t", "WANDB_API_KEY": "k", "DB_PASSWORD": "p"}
    assert steps.node_env(server) == {"PATH": "/usr/bin", "HF_HOME": "/models",
                                      "SLURM_CONF": "/etc/slurm.conf"}
    assert steps.contract(alloc) == {
        "AIFAB_BACKEND": "slurm", "AIFAB_PROFILE": "gh200", "AIFAB_SLURM_JOB_ID": "42",
        "AIFAB_GPUS": "4", "AIFAB_WALLTIME_END": "4600", "AIFAB_SLURM_PARTITION": "normal"}


def test_finetune_on_an_allocation_from_the_magic():
    from aifab.magics.finetune_magic import parse_finetune

    assert parse_finetune("m d.jsonl --on train --gpus 2") == (
        "run", {"model": "m", "data": "d.jsonl", "on": "train", "gpus": 2})


@pytest.mark.parametrize("slurm_ids, positions, expected", [
    ("0,1,2,3", "1,3", "1,3"),  # ConstrainDevices: the step's own 0..N-1
    ("4,5,6,7", "1,3", "5,7"),  # without it: the node's indices, as Slurm gave them
    ("4,5", "", ""),  # no GPU for this run
    (None, "0", "0"),  # Slurm set none: positions are the ids
])
def test_a_run_in_an_allocation_keeps_only_its_share_of_slurms_gpus(slurm_ids, positions,
                                                                    expected):
    from aifab.extension.steps import pick_gpus

    env = {"AIFAB_GPU_POSITIONS": positions}
    if slurm_ids is not None:
        env["CUDA_VISIBLE_DEVICES"] = slurm_ids
    pick_gpus(env)
    assert env["CUDA_VISIBLE_DEVICES"] == expected
    untouched = {"CUDA_VISIBLE_DEVICES": "2,3"}
    pick_gpus(untouched)  # not a run in an allocation: left as it is
    assert untouched == {"CUDA_VISIBLE_DEVICES": "2,3"}


def test_the_ledger_counts_only_the_pool_a_request_draws_from():
    from aifab.extension.ledger import GPUsBusy, allocate

    held = {"run": ["train:0"], "chat": ["0"]}
    # the session's own GPUs: the allocation's GPU held by 'run' does not count
    assert allocate("all", ("1",), {"run": ["train:0"]}) == ["1"]
    assert allocate(1, ("0", "1"), held) == ["1"]
    assert allocate("all", ("train:0", "train:1"), {"chat": ["0"]}) == ["train:0", "train:1"]
    with pytest.raises(GPUsBusy) as busy:
        allocate(2, ("train:0", "train:1"), held)
    assert str(busy.value) == ("2 GPU(s) requested but 1 free: GPU train:0 held by 'run'. "
                               "Stop one of those services or ask for fewer GPUs")
