"""The one supervisor of the session's long-lived processes, on psutil (as
``distributed/deploy/subprocess.py`` does): start a process in a group of its own, tell our
process from a later one that got its pid, find its descendants (torchrun starts each worker in
a session of its own, out of reach of a signal to the service's group), and stop the whole tree
with SIGTERM, then SIGKILL after a grace period. Services, dask worker jobs' watchdogs and the
test harness all use it; nothing else in the tree reads /proc.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence

import psutil

# psutil derives create_time from boot time and clock ticks: equal for one process, but
# compared as floats across a restart of the reader, allow a tick of rounding.
_SAME_START = 0.02


def start_time(pid: int) -> float | None:
    """When the process started, in seconds since boot (None when it is gone). Since boot,
    not since the epoch: psutil adds the boot time it rereads on every call, which moves
    when the clock is stepped (NTP), and a stepped clock must not make a live service look
    like another process."""
    try:
        return round(psutil.Process(pid).create_time() - psutil.boot_time(), 2)
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def is_same(pid: int, started: float | None) -> bool:
    """Whether ``pid`` is still the process that started at ``started`` (and not a zombie)."""
    if not pid or not started:
        return False
    now = start_time(pid)
    try:
        return (now is not None and abs(now - started) < _SAME_START
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def launch(argv: Sequence[str], *, env: Mapping[str, str], log_path: str | os.PathLike,
           cwd: str | os.PathLike) -> tuple[subprocess.Popen, float]:
    """Start ``argv`` (a list: never a shell) as the leader of a new session and process
    group, output appended to ``log_path``. Returns the process and its start time."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(list(argv), env=dict(env), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
                                start_new_session=True)
    return proc, start_time(proc.pid) or 0.0


def _groups_of_descendants(pid: int) -> set[int]:
    groups = set()
    try:
        children = psutil.Process(pid).children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return groups
    for child in children:
        try:
            groups.add(os.getpgid(child.pid))
        except OSError:
            continue
    return groups


def tree_groups(pid: int) -> set[int]:
    """The process groups of ``pid`` (a group leader) and of all its descendants."""
    return {pid} | _groups_of_descendants(pid)


def live_groups() -> set[int]:
    """Process groups that have a live (non-zombie) member."""
    groups = set()
    for proc in psutil.process_iter(["status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            groups.add(os.getpgid(proc.pid))
        except OSError:
            continue
    return groups


def group_alive(pgid: int) -> bool:
    return pgid in live_groups()


def signal_groups(groups: set[int], sig: int) -> None:
    for group in groups:
        try:
            os.killpg(group, sig)
        except (ProcessLookupError, PermissionError):
            pass


def signal_tree(pid: int, sig: int) -> None:
    """Send ``sig`` to the group of ``pid`` and to the groups of all its descendants."""
    signal_groups(tree_groups(pid), sig)


def kill_leftovers(pid: int, started: float | None) -> None:
    """SIGKILL what is left of a group whose leader is gone (an engine process whose parent
    died) — unless ``pid`` now belongs to another process: then the group is not ours."""
    if not pid:
        return
    now = start_time(pid)
    if now is not None and started and abs(now - started) >= _SAME_START:
        return
    signal_groups({pid}, signal.SIGKILL)


async def stop_tree(pid: int, started: float | None, *, grace: float, kill_wait: float = 5.0,
                    reap: Callable[[], None] | None = None,
                    first: signal.Signals = signal.SIGTERM) -> None:
    """End the process tree of ``pid``: ``first`` (SIGTERM) to every group in it, wait up to
    ``grace`` seconds, then SIGKILL what is left and wait up to ``kill_wait``. ``reap`` is
    called while waiting (a parent's chance to collect its child, so it does not linger as a
    zombie)."""
    if not is_same(pid, started):
        kill_leftovers(pid, started)
        return
    groups = tree_groups(pid)
    for sig, wait in ((first, grace), (signal.SIGKILL, kill_wait)):
        groups |= _groups_of_descendants(pid)  # workers started since
        signal_groups(groups, sig)
        deadline = time.monotonic() + wait
        while groups & live_groups() and time.monotonic() < deadline:
            if reap is not None:
                reap()
            await asyncio.sleep(0.1)
        if not groups & live_groups():
            break
    if reap is not None:
        reap()
