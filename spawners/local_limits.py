"""What a local session was given, enforced: its CPUs, its memory and its walltime.

On Slurm the job's cgroup does this and on Kubernetes the pod's; on the hub's own machine
nothing does unless we do. Where the hub may make cgroups (root, cgroup v1 or v2 with the
cpuset and memory controllers), the session's server runs in a cgroup of its own: every
process it starts (kernels, vLLM, runs, dask workers) is held to the memory and the CPUs
together, and the kernel's OOM killer stops what goes past. Elsewhere the server is pinned to
its CPUs (sched_setaffinity, inherited by its children) and each process is limited by
RLIMIT_DATA — per process, not per session; ``describe()`` says which one applies.
"""

from __future__ import annotations

import os
import re
import resource
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT = "aifab"  # every local session's cgroup lives under this one
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,120}")


@dataclass(frozen=True)
class Limits:
    cpus: tuple[int, ...]  # the CPUs the session may run on
    memory_bytes: int

    def describe(self, cgroup: bool) -> str:
        how = "a cgroup" if cgroup else "CPU affinity and a per-process RLIMIT_DATA"
        return (f"CPUs {','.join(map(str, self.cpus))}, {self.memory_bytes / 2**30:.0f} GiB "
                f"(enforced by {how})")


def choose_cpus(n: int, allowed: set[int], in_use: Counter) -> tuple[int, ...]:
    """``n`` of the ``allowed`` CPUs, the least used by other local sessions first (so two
    1-CPU sessions on a 2-core machine get a core each). Pure."""
    if n < 1:
        raise ValueError(f"a session needs at least one CPU, not {n}")
    if n > len(allowed):
        raise ValueError(f"{n} CPUs asked, this machine lets the hub use {len(allowed)}")
    ranked = sorted(allowed, key=lambda cpu: (in_use[cpu], cpu))
    return tuple(sorted(ranked[:n]))


def cpu_list(cpus: tuple[int, ...]) -> str:
    return ",".join(map(str, cpus))


class SessionCgroup:
    """The cgroup of one local session (v1: one per controller; v2: one), made by the hub."""

    def __init__(self, name: str, root: Path = CGROUP_ROOT):
        if not _NAME.fullmatch(name):
            raise ValueError(f"cgroup name {name!r}: letters, digits and . _ -")
        self.name = name
        self.root = root
        self.v2 = (root / "cgroup.controllers").is_file()
        if self.v2:
            self.dirs = {"memory": root / PARENT / name, "cpuset": root / PARENT / name}
        else:
            self.dirs = {c: root / c / PARENT / name for c in ("memory", "cpuset")}

    @staticmethod
    def available(root: Path = CGROUP_ROOT) -> bool:
        """Whether this process may make session cgroups here."""
        if os.geteuid() != 0:
            return False
        if (root / "cgroup.controllers").is_file():
            controllers = (root / "cgroup.controllers").read_text().split()
            return {"memory", "cpuset"} <= set(controllers)
        return all((root / c).is_dir() for c in ("memory", "cpuset"))

    def create(self, limits: Limits) -> None:
        if self.v2:
            parent = self.root / PARENT
            parent.mkdir(exist_ok=True)
            # children may use a controller only once the parent hands it down
            (self.root / "cgroup.subtree_control").write_text("+memory +cpuset")
            (parent / "cgroup.subtree_control").write_text("+memory +cpuset")
            d = self.dirs["memory"]
            d.mkdir(exist_ok=True)
            (d / "memory.max").write_text(str(limits.memory_bytes))
            if (d / "memory.swap.max").exists():
                (d / "memory.swap.max").write_text("0")
            (d / "cpuset.cpus").write_text(cpu_list(limits.cpus))
            return
        for controller in ("cpuset", "memory"):
            parent = self.root / controller / PARENT
            parent.mkdir(exist_ok=True)
            self.dirs[controller].mkdir(exist_ok=True)
        # v1 cpuset: a new group starts with no CPUs and no memory nodes, its parent too
        top = self.root / "cpuset"
        for d in (top / PARENT, self.dirs["cpuset"]):
            for f in ("cpuset.mems", "cpuset.cpus"):
                if not (d / f).read_text().strip():
                    (d / f).write_text((d.parent / f).read_text().strip())
        (self.dirs["cpuset"] / "cpuset.cpus").write_text(cpu_list(limits.cpus))
        mem = self.dirs["memory"]
        (mem / "memory.limit_in_bytes").write_text(str(limits.memory_bytes))
        if (mem / "memory.memsw.limit_in_bytes").exists():  # no escape into swap either
            (mem / "memory.memsw.limit_in_bytes").write_text(str(limits.memory_bytes))

    def procs_files(self) -> list[Path]:
        return sorted({d / "cgroup.procs" for d in self.dirs.values()})

    def pids(self) -> set[int]:
        pids: set[int] = set()
        for f in self.procs_files():
            try:
                pids |= {int(p) for p in f.read_text().split()}
            except OSError:
                continue
        return pids

    def remove(self) -> None:
        """Remove the (empty) cgroup; one still holding a process stays, and says so."""
        for d in set(self.dirs.values()):
            try:
                d.rmdir()
            except FileNotFoundError:
                continue


def enter(limits: Limits, cgroup: SessionCgroup | None) -> None:
    """Put the calling process under the limits. Runs in the session's process between fork
    and exec (JupyterHub's preexec_fn): no threads, no logging, only system calls."""
    if cgroup is not None:
        pid = str(os.getpid())
        for f in cgroup.procs_files():
            f.write_text(pid)
    os.sched_setaffinity(0, limits.cpus)
    if cgroup is None:
        resource.setrlimit(resource.RLIMIT_DATA, (limits.memory_bytes, limits.memory_bytes))
