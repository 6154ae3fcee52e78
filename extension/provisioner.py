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

from aifab.allocation import Allowance
from aifab.session import (
    ENV_BACKEND,
    ENV_GPUS,
    ENV_PROFILE,
    ENV_SLURM_JOB_ID,
    ENV_SLURM_PARTITION,
    ENV_WALLTIME_END,
)
from aifab.walltime import format_walltime, parse_walltime

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
        hours = format_walltime(min(walltime_s, a.max_walltime_s))
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
                           "allocation": f"kernel-{a.profile}"}}},
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

    # ------------------------------------------------------------ the allocation
    async def _allocation(self):
        if _manager is None:
            raise RuntimeError("kernels in an allocation need the aifab server extension")
        cfg = self._cfg
        name = cfg.get("allocation") or f"kernel-{cfg.get('profile', 'alloc')}"
        alloc = _manager.allocations.get(name)
        if alloc is None or not alloc.live:
            request = {k: v for k, v in cfg.items() if k != "allocation"}
            alloc = await _manager.create({**request, "name": name})
        deadline = time.monotonic() + self.start_timeout
        last = ""
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
            await asyncio.sleep(1.0)
            await _manager.refresh()
        return alloc

    # ------------------------------------------------------------ launch
    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        alloc = await self._allocation()
        self.job_id, self.node = alloc.job_id, alloc.nodes[0]
        km = self.parent
        km.transport = "tcp"
        km.ip = socket.gethostbyname(self.node)
        for port in ("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port"):
            setattr(km, port, _free_port(km.ip))
        if km.curve_publickey is None:  # a restart keeps the kernel's keys, as its session key
            km.curve_publickey, km.curve_secretkey = zmq.curve_keypair()
        km.write_connection_file()
        self.connection_info = km.get_connection_info()
        cmd = km.format_kernel_cmd(extra_arguments=kwargs.pop("extra_arguments", []))
        kwargs = await super().pre_launch(cmd=cmd, **kwargs)
        env = {k: v for k, v in kwargs["env"].items()
               if not k.startswith(("SLURM_", "SBATCH_", "SRUN_")) or k == "SLURM_CONF"}
        end = int((alloc.started_at or time.time()) + _walltime_s(alloc.request))
        env.update({ENV_BACKEND: "slurm", ENV_PROFILE: alloc.request["profile"],
                    ENV_SLURM_JOB_ID: alloc.job_id, ENV_GPUS: str(alloc.request["gpus"]),
                    ENV_WALLTIME_END: str(end),
                    ENV_SLURM_PARTITION: alloc.request.get("partition", "")})
        kwargs["env"] = env
        return kwargs

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        argv = ["srun", "--overlap", f"--jobid={self.job_id}", "-N1", "-n1",
                f"--nodelist={self.node}", f"--job-name={KERNEL_STEP}", "--quiet", *cmd]
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

    async def kill(self, restart: bool = False) -> None:
        # srun ends the step (the kernel on the node) when it is killed
        await self.send_signal(signal.SIGKILL)

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


def _walltime_s(request: dict) -> int:
    return parse_walltime(request["walltime"])


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
