"""Work inside an allocation the session holds: one job step, ``srun --overlap --jobid=JOB``,
launched from this server. Kernels (``provisioner.py``) and services (a fine-tune ``--on``
an allocation) both run this way, so what a step gets is decided here once:

* its command line: the allocation's CPUs and memory on its first node (srun's defaults are
  one CPU and DefMemPerCPU), a name that tells whose step it is;
* its environment: the server's, less what must not travel to a node other users share (the
  hub's and Jupyter's tokens, the session's own contract and GPUs, Slurm's job variables),
  plus the allocation's part of the session contract (its job, profile, GPUs, walltime end);
* its end: a step whose ``srun`` was killed lives on on the node, so it is ended by name.
"""

from __future__ import annotations

import time

from aifab import slurm
from aifab.session import (
    CONTRACT_VARS,
    ENV_ALLOCATABLE,
    ENV_BACKEND,
    ENV_GPUS,
    ENV_PROFILE,
    ENV_PUBLIC_URL,
    ENV_SERVER_TOKEN,
    ENV_SERVER_URL,
    ENV_SLURM_JOB_ID,
    ENV_SLURM_PARTITION,
    ENV_STATE_DIR,
    ENV_WALLTIME_END,
)
from aifab.walltime import parse_walltime

from .dask_jobs import SECRET_NAME

_NOT_FOR_THE_NODE = ("JUPYTERHUB_", "JPY_", "SLURM_", "SBATCH_", "SRUN_")
_NOT_FOR_THE_NODE_NAMES = {*CONTRACT_VARS, ENV_ALLOCATABLE, ENV_SERVER_URL, ENV_SERVER_TOKEN,
                           ENV_PUBLIC_URL, ENV_STATE_DIR, "CUDA_VISIBLE_DEVICES",
                           "NVIDIA_VISIBLE_DEVICES"}


def node_env(server_env: dict) -> dict:
    """What of the server's environment a step may see (the model cache, Hugging Face
    settings, PATH, ... go with it): no token, key or password of any name either (the
    same rule as for dask's worker jobs)."""
    return {k: v for k, v in server_env.items()
            if k == "SLURM_CONF" or not (k.startswith(_NOT_FOR_THE_NODE)
                                         or k in _NOT_FOR_THE_NODE_NAMES
                                         or SECRET_NAME.fullmatch(k))}


def walltime_end(alloc) -> int:
    """When the allocation's job ends (Slurm counts from its start)."""
    return int((alloc.started_at or time.time()) + parse_walltime(alloc.request["walltime"]))


def contract(alloc) -> dict[str, str]:
    """The allocation's part of the session contract, for what runs in it."""
    return {ENV_BACKEND: "slurm", ENV_PROFILE: alloc.request["profile"],
            ENV_SLURM_JOB_ID: alloc.job_id, ENV_GPUS: str(alloc.request["gpus"]),
            ENV_WALLTIME_END: str(walltime_end(alloc)),
            ENV_SLURM_PARTITION: alloc.request.get("partition", "")}


def step_argv(alloc, name: str, cmd: list[str]) -> list[str]:
    """``srun`` of ``cmd`` as a step named ``name`` on the allocation's first node. No
    ``--gres``: a step gets all of the job's GPUs (what uses fewer narrows
    CUDA_VISIBLE_DEVICES itself)."""
    return ["srun", "--overlap", f"--jobid={alloc.job_id}", "-N1", "-n1",
            f"--cpus-per-task={int(alloc.request.get('cpus', 1))}", "--mem=0",
            f"--nodelist={alloc.nodes[0]}", f"--job-name={name}", "--quiet", *cmd]


def _steps_named(out: str, name: str) -> list[str]:
    return [step for step, step_name in (line.split("|", 1) for line in out.splitlines()
                                          if "|" in line) if step_name == name]


def end_step(job_id: str, name: str) -> None:
    """scancel the job's steps named ``name`` (blocking: on the event loop, call it through
    ``asyncio.to_thread``). Raises aifab.slurm.SlurmError."""
    out = slurm.run(["squeue", "-h", "-s", "-j", job_id, "-o", "%i|%j"], timeout=30)
    if mine := _steps_named(out, name):
        slurm.run(["scancel", *mine], timeout=30)
