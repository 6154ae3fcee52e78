"""Work inside an allocation the session holds: one job step, ``srun --overlap --jobid=JOB``,
launched from this server. Kernels (``provisioner.py``) and services (a fine-tune ``--on``
an allocation) both run this way, so what a step gets is decided here once:

* its command line: the allocation's CPUs and memory on its first node (srun's defaults are
  one CPU and DefMemPerCPU), a name that tells whose step it is;
* its environment: the server's, less what must not travel to a node other users share (the
  hub's and Jupyter's tokens, the session's own contract and GPUs, Slurm's job variables),
  plus the allocation's part of the session contract (its job, profile, GPUs, walltime end);
* its GPUs: all of the job's, narrowed on the node to the ledger's share (``pick_gpus``);
* its end: a step whose ``srun`` was killed lives on on the node, so it is ended by name.

What the session may run work in is decided here too (``running_allocation``): the same
refusals for a run and a service.
"""

from __future__ import annotations

import asyncio
import secrets
import time

from aifab import slurm
from aifab.api import BadRequest
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

# positions in the step's GPU list that the ledger handed out (see pick_gpus)
ENV_GPU_POSITIONS = "AIFAB_GPU_POSITIONS"
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


def step_argv(alloc, name: str, cmd: list[str], *, nodes: int = 1) -> list[str]:
    """``srun`` of ``cmd`` as a step named ``name``: one task on each of the allocation's
    first ``nodes`` nodes (one node: its first). No ``--gres``: a step gets all of the job's
    GPUs (what uses fewer narrows CUDA_VISIBLE_DEVICES itself). A task that fails ends the
    others (--kill-on-bad-exit)."""
    return ["srun", "--overlap", f"--jobid={alloc.job_id}", f"-N{nodes}", f"-n{nodes}",
            "--ntasks-per-node=1", "--kill-on-bad-exit=1",
            f"--cpus-per-task={int(alloc.request.get('cpus', 1))}", "--mem=0",
            f"--nodelist={','.join(alloc.nodes[:nodes])}", f"--job-name={name}", "--quiet",
            *cmd]


def _steps_named(out: str, name: str) -> list[str]:
    return [step for step, step_name in (line.split("|", 1) for line in out.splitlines()
                                          if "|" in line) if step_name == name]


def end_step(job_id: str, name: str) -> None:
    """scancel the job's steps named ``name`` (blocking: on the event loop, call it through
    ``asyncio.to_thread``). Raises aifab.slurm.SlurmError."""
    out = slurm.run(["squeue", "-h", "-s", "-j", job_id, "-o", "%i|%j"], timeout=30)
    if mine := _steps_named(out, name):
        slurm.run(["scancel", *mine], timeout=30)


def step_name(what: str, name: str) -> str:
    """A step name per launch, ``aifab-WHAT-NAME-<random>``: a late clean-up of one attempt
    never ends the next one's step."""
    return f"aifab-{what}-{name}-{secrets.token_hex(3)}"


def running_allocation(manager, name: str, *, one_node: str = ""):
    """The session's running allocation ``name`` for work ``--on`` it. Raises BadRequest
    naming what there is; ``one_node``, for work that runs on one node only, says why an
    allocation of several nodes is refused."""
    held = manager.allocations if manager is not None else {}
    alloc = held.get(name)
    if alloc is None:
        live = ", ".join(n for n, a in held.items() if a.live) or "none"
        raise BadRequest(f"on={name!r}: no such allocation of this session (held: {live}); "
                         "request one with %alloc or aifab.allocate()")
    if alloc.state != "running":
        why = f" ({alloc.reason})" if alloc.state == "queued" and alloc.reason else ""
        raise BadRequest(f"on={name!r}: the allocation is {alloc.state}{why}, not running: "
                         "start it once the allocation runs")
    if one_node and alloc.request.get("nodes", 1) > 1:
        raise BadRequest(f"on={name!r}: the allocation has {alloc.request['nodes']} nodes; "
                         f"{one_node}")
    return alloc


def allocation_gpus(alloc) -> tuple[str, ...]:
    """The ledger's names of an allocation's GPUs: ``ALLOC:0``, ``ALLOC:1``, ..."""
    return tuple(f"{alloc.name}:{i}" for i in range(int(alloc.request.get("gpus", 0))))


def gpu_positions(alloc, gpus) -> dict[str, str]:
    """The environment that narrows a step to the ledger's share of its GPUs."""
    pool = allocation_gpus(alloc)
    return {ENV_GPU_POSITIONS: ",".join(str(pool.index(g)) for g in gpus)}


def pick_gpus(env) -> None:
    """On the node: a step is given positions in its GPU list (the ledger's share of the
    allocation): narrow Slurm's own CUDA_VISIBLE_DEVICES to them, whatever ids Slurm used
    (0..N-1 under ConstrainDevices, the node's own indices without it). Each process applies
    it once, before CUDA starts; torchrun's workers inherit Slurm's list."""
    if ENV_GPU_POSITIONS not in env:
        return
    positions = [int(p) for p in env[ENV_GPU_POSITIONS].split(",") if p]
    ids = [g for g in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if g]
    ids = ids or [str(i) for i in range(max(positions, default=-1) + 1)]
    env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[p] for p in positions)


_ENDING: set = set()


def end_step_soon(slurm_step: str) -> asyncio.Future | None:
    """A service's step ("JOB|STEP NAME") whose srun ended or was killed may live on on the
    node: end it, off the event loop's way when there is one (a step that already ended is
    not found; a failure is left to the allocation's own end). On a loop, returns the task,
    for a caller that waits for it."""
    if not slurm_step:
        return None
    job_id, name = slurm_step.split("|", 1)

    def end() -> None:
        try:
            end_step(job_id, name)
        except slurm.SlurmError:
            pass

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        end()
        return None
    task = asyncio.ensure_future(asyncio.to_thread(end))
    _ENDING.add(task)  # (the loop keeps only a weak reference to a task)
    task.add_done_callback(_ENDING.discard)
    return task


def first_node_address(alloc, on: str) -> str:
    """``node_address`` of the allocation's first node, for work ``on`` it. Blocking.
    Raises BadRequest when Slurm does not say."""
    try:
        return node_address(alloc.nodes[0])
    except slurm.SlurmError as exc:
        raise BadRequest(f"on={on!r}: Slurm does not say where node {alloc.nodes[0]} is: "
                         f"{exc}") from None


def node_address(node: str) -> str:
    """The address Slurm reaches ``node`` at (its NodeAddr; the name where none is set).
    Blocking: call it off the event loop. Raises aifab.slurm.SlurmError."""
    out = slurm.run(["scontrol", "show", "node", "-o", node], timeout=30)
    for field in out.split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1] or node
    return node
