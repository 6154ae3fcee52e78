"""``aifab.cluster(on="ALLOC")``: a dask cluster whose workers run inside a Slurm allocation
the session holds (``%alloc``), as job steps (``srun --overlap``), not as batch jobs of their
own: they start at once on nodes the session already has, spread over its nodes, and end with
it. The scheduler stays in the kernel.

dask-jobqueue still does the work it does for batch workers: the worker's command line, its
TLS files (``security=True``, throw-away certificates: a dask scheduler runs what it is sent),
names, scaling and adapting. Only how a worker starts and ends differs, so the job class
below replaces ``Job.start``/``Job.close``: a step lives as long as its ``srun``, and stopping
that ``srun`` (SIGTERM) cancels the step. The command line of the step is built where every
step's is (``aifab.extension.steps``), with the kernel's environment less its secrets.

Two addresses must be reachable across the cluster network: the scheduler listens on the
``interface`` given (the site's ``jobqueue.slurm.interface`` or the session's
``AIFAB_DASK_INTERFACE``; its address must be one the nodes can reach), and each worker on
its node's address as Slurm knows it (``NodeAddr``). The dashboard stays on 127.0.0.1, behind
Jupyter's proxy.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
from types import SimpleNamespace

from distributed.deploy.spec import ProcessInterface

from aifab import slurm
from aifab.extension import dask_jobs, steps
from aifab.session import Session

from .dask_cluster import (
    ClusterOptionError,
    SessionSLURMCluster,
    SessionSLURMJob,
    _check_count,
    _interfaces,
    _private_dir,
    slurm_settings,
)

# what an allocation decides already (or what a step has no use for)
_NOT_ON_ALLOCATION = ("queue", "account", "reservation", "walltime", "job_extra_directives",
                      "gpus_per_worker", "job_directives_skip", "job_script_prologue")


class AllocationStepJob(SessionSLURMJob):
    """One dask worker (or ``processes`` of them) as a step of an allocation."""

    def __init__(self, *args, allocation: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.allocation = allocation or {}
        self._srun: asyncio.subprocess.Process | None = None
        self._log = None

    def _node(self) -> str:
        """Workers go round the allocation's nodes by their number (name ``...-N``)."""
        nodes = self.allocation["nodes"]
        tail = str(self.name).rsplit("-", 1)[-1]
        return nodes[int(tail) % len(nodes)] if tail.isdigit() else nodes[0]

    async def start(self):
        node = self._node()
        alloc = SimpleNamespace(job_id=self.allocation["job_id"],
                                request=self.allocation["request"], nodes=[node])
        step = steps.step_name("dask", str(self.name))
        # the worker listens on its node's address as Slurm reaches it (the kernel must
        # reach it: the scheduler gathers results from the workers)
        argv = steps.step_argv(alloc, step, [*shlex.split(self._command_template),
                                             "--host", self.allocation["node_addrs"][node]])
        log_dir = self.log_directory or str(_private_dir("dask-logs"))
        self._log = open(os.path.join(log_dir, f"{step}.log"), "ab")  # noqa: SIM115
        # (in the kernel's process group: a kernel that is shut down takes its sruns along,
        # and srun ends the step)
        self._srun = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env=dask_jobs.submit_env())
        self.job_id = f"{alloc.job_id}|{step}"
        await ProcessInterface.start(self)

    async def close(self):
        srun, self._srun = self._srun, None
        if srun is not None and srun.returncode is None:
            srun.terminate()  # srun cancels its step on SIGTERM
            try:
                await asyncio.wait_for(srun.wait(), 30)
            except asyncio.TimeoutError:
                srun.kill()
                await srun.wait()
        ending = steps.end_step_soon(self.job_id)  # a step whose srun was killed lives on
        if ending is not None:
            await ending
        if self._log is not None:
            self._log.close()
        await ProcessInterface.close(self)


class AllocationCluster(SessionSLURMCluster):
    job_cls = AllocationStepJob

    @classmethod
    def for_allocation(cls, name: str, *, workers: int = 0, **overrides):
        from .client import ServiceRequestError, SessionClient

        for key in _NOT_ON_ALLOCATION:
            if key in overrides:
                raise ClusterOptionError(f"aifab.cluster(on={name!r}): {key!r} is the "
                                         "allocation's own (its partition, account, time and "
                                         "GPUs); workers run as steps inside it")
        try:
            info = SessionClient().request("GET", f"aifab/api/allocations/{name}")
        except ServiceRequestError as exc:
            raise ClusterOptionError(f"aifab.cluster(on={name!r}): {exc}") from None
        if info["state"] != "running":
            raise ClusterOptionError(f"aifab.cluster(on={name!r}): the allocation is "
                                     f"{info['state']}, not running; wait for it "
                                     "(%alloc ... --wait or .wait_running())")
        cpus = int(info["request"].get("cpus", 1))
        o = dict(overrides)
        o["cores"] = _check_count("cores", o.get("cores", cpus), 1, cpus)
        # (the interface as for batch workers: keyword, site config, session; checked there)
        settings = slurm_settings(Session.from_env(), o)
        if not settings["interface"]:
            raise ClusterOptionError(
                f"aifab.cluster(on={name!r}): give interface=NAME, the network interface of "
                "this machine that the allocation's nodes reach (the site may set "
                f"jobqueue.slurm.interface); this machine has: {', '.join(sorted(_interfaces()))}")
        # the scheduler on that interface; the workers on their nodes' addresses (not the
        # interface: its name is this machine's), asked of Slurm once
        settings["scheduler_options"] = {**settings["scheduler_options"],
                                         "interface": settings.pop("interface")}
        try:
            info["node_addrs"] = {n: steps.node_address(n) for n in info["nodes"]}
        except slurm.SlurmError as exc:
            raise ClusterOptionError(f"aifab.cluster(on={name!r}): Slurm does not say where "
                                     f"its nodes are: {exc}") from None
        return cls._started(settings, workers, allocation=info)

    def job_states(self) -> dict[str, tuple[str, str]]:
        return {}  # steps of a running allocation never queue
