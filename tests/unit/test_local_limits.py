"""The local backend's limits, without a hub: which CPUs a session gets, and the cgroup files
it writes (against a cgroup tree laid out in a temporary folder, v1 and v2)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest

from aifab.spawners.local_limits import Limits, SessionCgroup, choose_cpus


def test_sessions_spread_over_the_cores():
    used = Counter()
    first = choose_cpus(1, {0, 1}, used)
    used.update(first)
    second = choose_cpus(1, {0, 1}, used)
    assert {first, second} == {(0,), (1,)}
    assert choose_cpus(2, {0, 1, 2, 3}, Counter({0: 1, 1: 1})) == (2, 3)
    with pytest.raises(ValueError, match="3 CPUs asked, this machine lets the hub use 2"):
        choose_cpus(3, {0, 1}, Counter())


def _v1_tree(root):
    for controller in ("memory", "cpuset"):
        (root / controller).mkdir(parents=True)
    (root / "cpuset" / "cpuset.cpus").write_text("0-3\n")
    (root / "cpuset" / "cpuset.mems").write_text("0\n")


def test_a_v1_session_cgroup_gets_its_cpus_memory_and_no_swap(tmp_path, monkeypatch):
    _v1_tree(tmp_path)
    real_mkdir = type(tmp_path).mkdir

    def mkdir_like_cgroupfs(self, *a, **kw):  # the kernel fills a new group's files
        real_mkdir(self, *a, **kw)
        if self.parent.name == "aifab" or self.name == "aifab":
            if "cpuset" in self.parts:
                for f in ("cpuset.cpus", "cpuset.mems", "cgroup.procs"):
                    (self / f).touch()
            else:
                for f in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes",
                          "cgroup.procs"):
                    (self / f).touch()

    monkeypatch.setattr(type(tmp_path), "mkdir", mkdir_like_cgroupfs)
    group = SessionCgroup("ada-default", root=tmp_path)
    assert not group.v2
    group.create(Limits(cpus=(1,), memory_bytes=2 * 2**30))
    d = tmp_path / "cpuset" / "aifab" / "ada-default"
    assert (d / "cpuset.cpus").read_text() == "1"
    assert (d / "cpuset.mems").read_text() == "0"  # copied down: a group needs its nodes
    assert (tmp_path / "cpuset" / "aifab" / "cpuset.cpus").read_text() == "0-3"
    m = tmp_path / "memory" / "aifab" / "ada-default"
    assert (m / "memory.limit_in_bytes").read_text() == str(2 * 2**30)
    assert (m / "memory.memsw.limit_in_bytes").read_text() == str(2 * 2**30)
    assert group.procs_files() == sorted([d / "cgroup.procs", m / "cgroup.procs"])


def test_a_v2_session_cgroup_uses_one_group(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    group = SessionCgroup("bob-lab", root=tmp_path)
    assert group.v2
    group.create(Limits(cpus=(0, 1), memory_bytes=3 * 2**30))
    d = tmp_path / "aifab" / "bob-lab"
    assert (d / "memory.max").read_text() == str(3 * 2**30)
    assert (d / "cpuset.cpus").read_text() == "0,1"
    assert (tmp_path / "aifab" / "cgroup.subtree_control").read_text() == "+memory +cpuset"
    assert group.procs_files() == [d / "cgroup.procs"]


def test_cgroup_names_are_checked():
    with pytest.raises(ValueError, match="letters, digits"):
        SessionCgroup("../escape")


def test_without_a_cgroup_a_session_is_pinned_and_limited_per_process():
    """What enter() does where no cgroup can be made, in a child process (so this one keeps
    its own CPUs and limits)."""
    code = ("import os, resource\n"
            "from aifab.spawners.local_limits import Limits, enter\n"
            "cpu = min(os.sched_getaffinity(0))\n"
            "enter(Limits(cpus=(cpu,), memory_bytes=2**30), None)\n"
            "print(len(os.sched_getaffinity(0)), resource.getrlimit(resource.RLIMIT_DATA)[0])\n"
            "try:\n    bytearray(2 * 2**30)\nexcept MemoryError:\n    print('refused')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env={**os.environ})
    assert out.stdout.split() == ["1", str(2**30), "refused"], out.stderr
