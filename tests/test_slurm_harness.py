"""Self-check of tests/harness/slurm.py: config rendering, and one real cluster run."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.harness.slurm import (
    SlurmCluster,
    SlurmConfig,
    SlurmHarnessError,
    _running,
    render_gres_conf,
    render_slurm_conf,
)


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln and not ln.startswith("#")]


def test_render_slurm_conf_gpu_type_and_partitions(tmp_path: Path) -> None:
    cfg = SlurmConfig(root=tmp_path, cpus=72, gpu_type="gh200", partitions=("gpu", "cpu"))
    text = render_slurm_conf(cfg)
    node = next(ln for ln in _lines(text) if ln.startswith("NodeName="))
    assert "Gres=gpu:gh200:4" in node.split()
    assert "CPUs=72" in node.split() and "NodeAddr=127.0.0.1" in node.split()
    parts = [ln for ln in _lines(text) if ln.startswith("PartitionName=")]
    assert parts == [
        "PartitionName=gpu Nodes=localhost MaxTime=INFINITE State=UP Default=YES",
        "PartitionName=cpu Nodes=localhost MaxTime=INFINITE State=UP",
    ]
    for key in ("SlurmctldHost=localhost", "SlurmdParameters=config_overrides",
                "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
                "AccountingStorageType=accounting_storage/none", "GresTypes=gpu",
                f"AuthInfo=socket={tmp_path}/munge/munge.socket",
                "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=1"):
        assert key in _lines(text)
    assert not any("AccountingStorageTRES" in ln for ln in _lines(text))


def test_render_without_gpus(tmp_path: Path) -> None:
    cfg = SlurmConfig(root=tmp_path, gpus=0)
    node = next(ln for ln in _lines(render_slurm_conf(cfg)) if ln.startswith("NodeName="))
    assert "Gres" not in node
    assert render_gres_conf(cfg, "") == "AutoDetect=off\n"


def test_render_gres_conf(tmp_path: Path) -> None:
    cfg = SlurmConfig(root=tmp_path, gpus=2, gpu_type="gh200")
    assert render_gres_conf(cfg, "/x/nvidia[0-1]") == (
        "AutoDetect=off\nNodeName=localhost Name=gpu Type=gh200 File=/x/nvidia[0-1]\n")


def _gpu_job(cluster: SlurmCluster, out: Path) -> str:
    return cluster.run(
        "sbatch", "--parsable", "--gpus-per-node=2", "-o", str(out),
        "--wrap", "echo $CUDA_VISIBLE_DEVICES; sleep 30",
    ).stdout.strip().split(";")[0]


@pytest.mark.slurm
def test_fake_gpus_are_allocated_like_real_ones(slurm, work_root) -> None:
    """The session cluster: two 2-GPU jobs get disjoint GPUs, a third waits on Resources."""
    assert os.path.realpath("/etc/slurm/slurm.conf") == str(slurm.conf_path)
    outs = [work_root / f"gpu-job{i}.out" for i in range(2)]
    jobs = [_gpu_job(slurm, out) for out in outs]
    try:
        def both_running() -> bool:
            rows = {r["job_id"]: r for r in slurm.squeue()}
            return all(rows.get(j, {}).get("state") == "RUNNING" for j in jobs) and all(
                o.exists() and o.read_text().strip() for o in outs)

        slurm.wait_for(both_running, 20, what="two 2-GPU jobs running with output")
        assert sorted(o.read_text().strip() for o in outs) == ["0,1", "2,3"]

        third = _gpu_job(slurm, work_root / "gpu-job2.out")
        jobs.append(third)

        def third_waits() -> bool:
            rows = slurm.squeue("-j", third)
            return bool(rows) and (rows[0]["state"], rows[0]["reason"]) == ("PENDING", "Resources")

        slurm.wait_for(third_waits, 10, what="third 2-GPU job PENDING (Resources)")
        too_many = slurm.run("sbatch", "--parsable", "--gpus-per-node=5", "--wrap", "true",
                             check=False)
        assert too_many.returncode != 0, too_many.stdout

        # a second cluster on the same ports names the slurmctld holding the port
        ctld = int((slurm.root / "pids" / "slurmctld.pid").read_text())
        other = SlurmCluster(SlurmConfig(root=work_root / "other", link_etc=False))
        with pytest.raises(SlurmHarnessError, match=rf"(?s)6817.*pid {ctld}.*left over"):
            other.start(timeout=10)
        assert not list((work_root / "other" / "pids").glob("*.pid"))
    finally:
        slurm.run("scancel", *jobs, check=False)
        slurm.wait_for(lambda: not slurm.squeue(), 15, what="test jobs cancelled")


@pytest.mark.slurm
def test_stop_ends_exactly_the_recorded_daemons(slurm, work_root) -> None:
    """A second, private cluster on other ports: start, stop, nothing left."""
    root = work_root / "second"
    cluster = SlurmCluster(SlurmConfig(root=root, gpus=0, ctld_port=6917, slurmd_port=6918,
                                       link_etc=False))
    cluster.start(warmup=False)
    daemons = [int((root / "pids" / f"{n}.pid").read_text())
               for n in ("munged", "slurmctld", "slurmd@localhost")]
    t0 = time.monotonic()
    cluster.stop()
    print(f"stop() took {time.monotonic() - t0:.2f}s")
    assert not any(_running(pid) for pid in daemons)
    assert not list((root / "pids").glob("*.pid"))
    # the session cluster is untouched
    assert slurm.run("sinfo", "-h", "-o", "%T").stdout.split()[0] in ("idle", "mixed")
