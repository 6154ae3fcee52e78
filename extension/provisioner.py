"""Kernels inside a Slurm allocation the session holds: a jupyter_client kernel provisioner.

The notebook server stays where it is (the hub's machine, a pod); the kernel runs on the
allocation's node as a job step, ``srun --overlap --jobid=JOB``. Its kernel spec names a
profile and a size ("Python 3 (aifab) · GH200 ×4 · 1 h", see ``kernel_specs``); the first
start requests the allocation (or finds it held), a restart reuses it, a shutdown ends only
the step: the allocation lives on by its own rules (``allocations.py``).

The ZeroMQ channels between server and node are encrypted and authenticated with CurveZMQ:
the provisioner makes a key pair per kernel (jupyter_client >= 8.9 writes it into the
connection file, mode 0600; ipykernel's sockets then accept only clients that know it).
Interrupts are messages (``interrupt_mode: message``): a signal to ``srun`` would not reach
the kernel as one.

Not jupyter_client's LocalProvisioner: it binds ports and checks the IP on this machine and
launches the kernel here; this one's kernel binds on the node.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import zmq
from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase

from aifab import slurm
from aifab.allocation import Allowance
from aifab.api import Conflict

from . import steps
from .allocations import KERNEL_STEP, AllocationManager

PROVISIONER_NAME = "aifab-allocation"
CONFIG_KEYS = ("profile", "nodes", "gpus", "cpus", "memory_gb", "walltime", "allocation")
_manager: AllocationManager | None = None


def use_manager(manager: AllocationManager) -> None:
    """The server extension hands its allocations to the provisioners of its kernels."""
    global _manager
    _manager = manager


def kernel_specs(allowances: list[Allowance], python: str, walltime_s: int = 3600) -> dict:
    """One kernel spec per Slurm profile the session may allocate: {name: kernel.json}."""
    specs = {}
    for a in allowances:
        gpus = a.max_gpus
        held = min(walltime_s, a.max_walltime_s)
        hours = f"{held // 3600} h" if held % 3600 == 0 else f"{held // 60} min"
        label = f"{a.gres_type.upper() or 'GPU'} ×{gpus}" if gpus else "CPU"
        specs[f"aifab-{a.profile}"] = {
            "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}",
                     "--ext=aifab.magics"],
            "display_name": f"Python 3 (aifab) · {label} · {hours}",
            "language": "python",
            "interrupt_mode": "message",
            "metadata": {"kernel_provisioner": {
                "provisioner_name": PROVISIONER_NAME,
                "config": {"profile": a.profile, "gpus": gpus,
                           "walltime": min(walltime_s, a.max_walltime_s) // 60,
                           "allocation": f"kernel-{a.profile}"[:40].rstrip("-")}}},
        }
    return specs


class AllocationProvisioner(KernelProvisionerBase):
    """A kernel as a step of one of the session's allocations (see the module's docstring)."""

    start_timeout = 600.0  # seconds a start may wait for its allocation in the queue

    def __init__(self, **kwargs):
        # the kernel spec's provisioner config arrives as keyword arguments
        self._cfg = {k: kwargs.pop(k) for k in list(kwargs) if k in CONFIG_KEYS}
        super().__init__(**kwargs)
        self.process: subprocess.Popen | None = None
        self.job_id = ""
        self.node = ""
        self._alloc = None  # the allocation this start runs in (pre_launch finds it)

    # ------------------------------------------------------------ the allocation
    async def _allocation(self):
        if _manager is None:
            raise RuntimeError("kernels in an allocation need the aifab server extension")
        cfg = self._cfg
        name = cfg.get("allocation") or f"kernel-{cfg.get('profile', 'alloc')}"[:40]
        alloc = _manager.allocations.get(name)
        if self.job_id:
            # a restart stays in the allocation the kernel was started in, or fails: it never
            # asks Slurm for a new one on its own
            if alloc is None or alloc.job_id != self.job_id or alloc.state != "running":
                raise RuntimeError(f"allocation {name!r} (job {self.job_id}) is "
                                   f"{alloc.state if alloc else 'gone'}: start a new kernel "
                                   "to request another")
            return alloc
        if alloc is None or not alloc.live:
            request = {k: v for k, v in cfg.items() if k != "allocation"}
            try:
                alloc = await _manager.create({**request, "name": name})
            except Conflict:  # a second kernel of this spec asked at the same moment
                alloc = _manager.get(name)
        deadline = time.monotonic() + self.start_timeout
        last = ""
        # Slurm schedules a job as it is submitted: on an idle node it runs within a fraction
        # of a second, so look again soon, then less often (up to every 2 s) while it queues
        delay = 0.1
        while alloc.state != "running":
            if not alloc.live:
                raise RuntimeError(f"allocation {name!r} {alloc.state}: {alloc.message}")
            said = f"{alloc.state} ({alloc.reason or 'waiting'}), position {alloc.position}"
            if said != last:
                self.log.info("aifab: kernel %s waits for allocation %s (job %s): %s",
                              self.kernel_id, name, alloc.job_id, said)
                last = said
            if time.monotonic() > deadline:
                raise TimeoutError(f"allocation {name!r} still {said} after "
                                   f"{self.start_timeout:.0f} s")
            await asyncio.sleep(delay)
            delay = min(2.0, delay * 1.6)
            await _manager.refresh()  # one at a time, shared with the server's monitor
        alloc.last_used = time.time()  # not idle: a kernel is about to run in it
        return alloc

    # ------------------------------------------------------------ launch
    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        alloc = await self._allocation()
        self.job_id, self.node = alloc.job_id, alloc.nodes[0]
        km = self.parent
        km.transport = "tcp"
        km.ip = socket.gethostbyname(self.node)
        if not km.shell_port:  # a restart keeps its ports: the connection file keeps them too
            for port in ("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port"):
                setattr(km, port, _free_port(km.ip))
        if km.curve_publickey is None:  # a restart keeps the kernel's keys, as its session key
            km.curve_publickey, km.curve_secretkey = zmq.curve_keypair()
        km.write_connection_file()
        self.connection_info = km.get_connection_info()
        cmd = km.format_kernel_cmd(extra_arguments=kwargs.pop("extra_arguments", []))
        kwargs = await super().pre_launch(cmd=cmd, **kwargs)
        kwargs["env"] = {**steps.node_env(kwargs["env"]), **steps.contract(alloc)}
        self._alloc = alloc
        return kwargs

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        argv = steps.step_argv(self._alloc, self.step_name, cmd)
        self.process = subprocess.Popen(argv, env=kwargs["env"], cwd=kwargs.get("cwd"),
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        return self.connection_info

    # ------------------------------------------------------------ the step's process (srun)
    @property
    def has_process(self) -> bool:
        return self.process is not None

    async def poll(self) -> int | None:
        return self.process.poll() if self.process else 0

    async def wait(self) -> int | None:
        while self.process is not None and self.process.poll() is None:
            await asyncio.sleep(0.1)
        code = self.process.returncode if self.process else None
        self.process = None
        return code

    async def send_signal(self, signum: int) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signum)

    @property
    def step_name(self) -> str:
        return f"{KERNEL_STEP}-{(self.kernel_id or 'kernel')[:8]}"

    async def kill(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGKILL)
        # a killed srun cannot pass the end on: end the step itself
        try:
            await asyncio.to_thread(steps.end_step, self.job_id, self.step_name)
        except slurm.SlurmError as exc:
            self.log.warning("aifab: could not end kernel step in job %s: %s", self.job_id, exc)

    async def terminate(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGTERM)

    async def cleanup(self, restart: bool = False) -> None:
        pass  # the allocation is the session's, not the kernel's

    async def get_provisioner_info(self) -> dict[str, Any]:
        info = await super().get_provisioner_info()
        info.update(job_id=self.job_id, node=self.node)
        return info

    async def load_provisioner_info(self, provisioner_info: dict) -> None:
        await super().load_provisioner_info(provisioner_info)
        self.job_id = provisioner_info.get("job_id", "")
        self.node = provisioner_info.get("node", "")

    def get_shutdown_wait_time(self, recommended: float = 5.0) -> float:
        return max(recommended, 10.0)  # srun passes the end on to the node

    def get_stable_start_time(self, recommended: float = 10.0) -> float:
        return max(recommended, 30.0)


def _free_port(ip: str) -> int:
    """A port for the kernel to bind on its node: checked here when the node is this machine,
    else one at random from the ephemeral range (the node's own check is its bind)."""
    try:
        with socket.socket() as s:
            s.bind((ip, 0))
            return s.getsockname()[1]
    except OSError:
        return random.randint(40000, 60000)


def install_specs(directory: Path, specs: dict) -> None:
    for name, spec in specs.items():
        folder = directory / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "kernel.json").write_text(json.dumps(spec, indent=2))


__all__ = ["AllocationProvisioner", "PROVISIONER_NAME", "install_specs", "kernel_specs",
           "use_manager"]
