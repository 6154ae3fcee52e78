"""``aifab.allocate(...)``: a Slurm allocation this session holds, and ``%alloc``.

The allocation belongs to the session (the Jupyter server), not the kernel: it outlives a
kernel restart, is released by ``.release()`` / ``%alloc release NAME``, when nothing has run
in it for the server's idle time, or when the session ends. Requests are checked by the
server against what the hub's profiles allow; the messages are the server's.
"""

from __future__ import annotations

import time

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class

from .client import ServiceRequestError, SessionClient
from .parsing import MagicArgumentParser

USAGE = """%alloc [PROFILE] [--nodes N] [--gpus G] [--cpus C] [--memory GB] [--walltime T]
       [--name NAME] [--wait]
%alloc list | %alloc release NAME"""


class Allocation:
    """A handle on one of the session's allocations."""

    def __init__(self, name: str, client: SessionClient | None = None):
        self.name = name
        self._client = client or SessionClient()

    @property
    def info(self) -> dict:
        return self._client.request("GET", f"aifab/api/allocations/{self.name}")

    @property
    def state(self) -> str:
        return self.info["state"]

    @property
    def job_id(self) -> str:
        return self.info["job_id"]

    @property
    def nodes(self) -> list[str]:
        return self.info["nodes"]

    def wait_running(self, timeout: float = 600) -> Allocation:
        """Until Slurm has started it; TimeoutError says where it stands in the queue."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.info
            if info["state"] == "running":
                return self
            if info["state"] not in ("queued", "running"):
                raise RuntimeError(f"allocation {self.name!r} {info['state']}: "
                                   f"{info['message']}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"allocation {self.name!r} still {describe(info)} after "
                                   f"{timeout:.0f}s")
            time.sleep(1.0)

    def release(self) -> dict:
        return self._client.request("DELETE", f"aifab/api/allocations/{self.name}")

    def __repr__(self) -> str:
        try:
            return f"<Allocation {self.name!r} {describe(self.info)}>"
        except (ServiceRequestError, OSError) as exc:
            return f"<Allocation {self.name!r} (unknown: {exc})>"


def describe(info: dict) -> str:
    """One line: 'queued (Resources), 2nd in line, Slurm expects 14:05' / 'running on n1'."""
    state = info["state"]
    if state == "queued":
        parts = [f"queued ({info['reason'] or 'waiting'})"]
        if info.get("position"):
            parts.append(f"position {info['position']} in the partition's queue")
        if info.get("estimated_start"):
            parts.append(f"Slurm expects it at {info['estimated_start'].replace('T', ' ')}")
        return ", ".join(parts) + f" - job {info['job_id']}"
    if state == "running":
        return f"running on {','.join(info['nodes'])} - job {info['job_id']}"
    return f"{state}: {info['message']}" if info.get("message") else state


def allocate(profile: str | None = None, *, nodes: int | None = None, gpus: int | None = None,
             cpus: int | None = None, memory_gb: int | None = None,
             walltime: str | int | None = None, name: str | None = None, wait: bool = False,
             timeout: float = 600) -> Allocation:
    """Ask Slurm for an allocation of a profile the hub lets you use (None: the first)."""
    spec = {k: v for k, v in (("profile", profile), ("nodes", nodes), ("gpus", gpus),
                              ("cpus", cpus), ("memory_gb", memory_gb),
                              ("walltime", walltime), ("name", name)) if v is not None}
    client = SessionClient()
    info = client.request("POST", "aifab/api/allocations", json=spec, timeout=120)
    alloc = Allocation(info["name"], client)
    return alloc.wait_running(timeout) if wait else alloc


def allocations() -> list[dict]:
    return SessionClient().request("GET", "aifab/api/allocations")["allocations"]


@magics_class
class AllocMagics(Magics):
    @line_magic
    def alloc(self, line: str):
        words = line.split()
        try:
            if words[:1] == ["list"]:
                for info in allocations():
                    print(f"{info['name']}: {describe(info)}")
                return None
            if words[:1] == ["release"]:
                if len(words) != 2:
                    raise UsageError(f"usage: {USAGE}")
                info = Allocation(words[1]).release()
                print(f"{info['name']}: {describe(info)}")
                return None
            p = MagicArgumentParser(prog="%alloc", usage_text=USAGE)
            p.add_argument("profile", nargs="?")
            for flag in ("nodes", "gpus", "cpus", "memory"):
                p.add_argument(f"--{flag}", type=int)
            p.add_argument("--walltime")
            p.add_argument("--name")
            p.add_argument("--wait", action="store_true")
            args = p.parse_args(words)
            alloc = allocate(args.profile, nodes=args.nodes, gpus=args.gpus, cpus=args.cpus,
                             memory_gb=args.memory, walltime=args.walltime, name=args.name,
                             wait=args.wait)
        except (ServiceRequestError, TimeoutError, RuntimeError) as exc:
            raise UsageError(str(exc)) from None  # one line in the notebook, no traceback
        print(f"{alloc.name}: {describe(alloc.info)}")
        return alloc
