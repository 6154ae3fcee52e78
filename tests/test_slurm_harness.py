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
def test_real_cluster_gpus(tmp_path_factory: pytest.TempPathFactory) -> None:
    if os.geteuid() != 0:
        pytest.skip("a real Slurm cluster needs root")
    root = tmp_path_factory.mktemp("slurm")
    # jobs may run as other users: the root and its parents must be traversable
    for d in (root, *root.parents):
        if d == Path("/tmp") or d == d.parent:
            break
        d.chmod(0o755)
    cluster = SlurmCluster(SlurmConfig(root=root))
    assert os.path.realpath("/etc/slurm/slurm.conf") != str(cluster.conf_path)
    t0 = time.monotonic()
    cluster.start()
    print(f"start() took {time.monotonic() - t0:.2f}s")
    assert os.path.realpath("/etc/slurm/slurm.conf") == str(cluster.conf_path)
    daemons = [int((root / "pids" / f"{n}.pid").read_text()) for n in
               ("munged", "slurmctld", "slurmd")]
    try:
        outs = [root / f"job{i}.out" for i in range(2)]
        jobs = [_gpu_job(cluster, out) for out in outs]

        def both_running() -> bool:
            rows = {r["job_id"]: r for r in cluster.squeue()}
            return all(rows.get(j, {}).get("state") == "RUNNING" for j in jobs) and all(
                o.exists() and o.read_text().strip() for o in outs)

        cluster.wait_for(both_running, 20, what="two 2-GPU jobs running with output")
        assert sorted(o.read_text().strip() for o in outs) == ["0,1", "2,3"]

        third = _gpu_job(cluster, root / "job2.out")

        def third_waits() -> bool:
            rows = cluster.squeue("-j", third)
            return bool(rows) and (rows[0]["state"], rows[0]["reason"]) == ("PENDING", "Resources")

        cluster.wait_for(third_waits, 10, what="third 2-GPU job PENDING (Resources)")
        row = cluster.squeue("-j", third)[0]
        assert row["gres"].endswith("gpu:2"), row

        too_many = cluster.run("sbatch", "--parsable", "--gpus-per-node=5", "--wrap", "true",
                               check=False)
        assert too_many.returncode != 0, too_many.stdout

        # a second cluster on the same ports names the slurmctld holding the port
        other = SlurmCluster(SlurmConfig(root=root / "other", link_etc=False))
        with pytest.raises(SlurmHarnessError, match=rf"(?s)6817.*pid {daemons[1]}.*left over"):
            other.start(timeout=10)
        assert not list((root / "other" / "pids").glob("*.pid"))
    except BaseException:
        print(cluster.log_tail())
        raise
    finally:
        t0 = time.monotonic()
        cluster.stop()
        print(f"stop() took {time.monotonic() - t0:.2f}s")
    assert not any(_running(pid) for pid in daemons)
    assert not list((root / "pids").glob("*.pid"))
