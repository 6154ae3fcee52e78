"""Slurm jobs that a session's dask clusters submit: how they are tagged, found and cancelled.

Every worker job carries ``--comment=aifab-dask;session=S;kernel=HOST:PID:START``:

* ``session`` is a hash of the JupyterHub user and server name (the same for every server of
  that named session), so a new server can find what an earlier one of the session left;
* ``kernel`` names the process that owns the cluster, with its start time, so a sweep can tell
  a live kernel's jobs (kept) from a dead one's (cancelled) even after PIDs are reused.

Three things cancel jobs, so that none outlives what started it:

1. the cluster's own ``close()`` (dask-jobqueue);
2. a watchdog process per kernel (``python -m aifab.extension.dask_jobs watch``), in its own session
   so it survives the kernel: it cancels the kernel's jobs the moment the kernel exits, however
   it exits (``kill -9`` included), and when it is itself asked to stop;
3. the server extension: at start it sweeps this session's jobs whose kernel is gone, and when
   the server stops it cancels all of the session's jobs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pwd
import re
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from aifab import slurm, supervisor
from aifab.names import SLURM_JOB_ID

COMMENT_PREFIX = "aifab-dask"
JOB_NAME = "aifab-dask"
_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}")
_TAG = re.compile(
    r"aifab-dask;session=(?P<session>[0-9a-f]{16});kernel=(?P<host>[A-Za-z0-9.-]{1,253}):"
    r"(?P<pid>[0-9]{1,10}):(?P<start>[0-9]{1,20})")
# Names of variables that must not travel into a worker job's environment: tokens and keys
# (the job's environment is stored by slurmctld), and the session job's own Slurm variables,
# which would confuse sbatch and srun inside the worker job.
SECRET_NAME = re.compile(
    r".*(TOKEN|SECRET|PASSW|CREDENTIAL|PRIVATE|APIKEY|(^|_)KEY(_|$)).*", re.I)
# GPUs are the session's, not a worker job's: Slurm sets these for jobs that ask for GPUs
_GPU_VARS = {"CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES",
             "GPU_DEVICE_ORDINAL", "HIP_VISIBLE_DEVICES"}


def session_key(env=None) -> str:
    """One key per named session: the hub user and server name, or user@host without a hub."""
    env = os.environ if env is None else env
    user = env.get("JUPYTERHUB_USER")
    if user:
        name = f"hub:{user}/{env.get('JUPYTERHUB_SERVER_NAME', '')}"
    else:
        name = f"local:{pwd.getpwuid(os.getuid()).pw_name}@{socket.gethostname()}"
    return hashlib.sha256(name.encode()).hexdigest()[:16]


def this_host() -> str:
    """The host name as tags carry it (hashed if it has characters a tag cannot hold)."""
    host = socket.gethostname()
    return host if _HOST.fullmatch(host) else hashlib.sha256(host.encode()).hexdigest()[:16]


def process_start(pid: int) -> int | None:
    """The process's start time in milliseconds since the epoch (None when it is gone): with
    the pid it names one process, even after the pid is reused."""
    started = supervisor.start_time(pid)
    return None if started is None else int(started * 1000)


@dataclass(frozen=True)
class KernelRef:
    host: str
    pid: int
    start: int

    @classmethod
    def this_process(cls) -> KernelRef:
        pid = os.getpid()
        return cls(this_host(), pid, process_start(pid) or 0)

    def alive(self) -> bool:
        """Whether the kernel still runs. A kernel on another host counts as gone: a named
        session has one server at a time, so another host means an earlier session."""
        return self.host == this_host() and process_start(self.pid) == self.start


def comment(session: str, kernel: KernelRef) -> str:
    return f"{COMMENT_PREFIX};session={session};kernel={kernel.host}:{kernel.pid}:{kernel.start}"


@dataclass(frozen=True)
class TaggedJob:
    job_id: str
    state: str
    reason: str
    session: str
    kernel: KernelRef


def submit_env(env=None) -> dict[str, str]:
    """The environment sbatch and scancel run with (and worker jobs inherit): the kernel's,
    less secrets, GPU lists and the session job's own SLURM_*/SBATCH_* settings (SLURM_CONF
    stays)."""
    env = os.environ if env is None else env
    return {k: v for k, v in env.items()
            if not SECRET_NAME.fullmatch(k) and k not in _GPU_VARS
            and not (k.startswith(("SLURM_", "SBATCH_", "SALLOC_")) and k != "SLURM_CONF")}


def list_jobs(session: str | None = None, timeout: float = 20) -> list[TaggedJob]:
    """This user's aifab dask jobs still in the queue (optionally of one session). Raises
    aifab.slurm.SlurmError."""
    out = slurm.run(["squeue", "--me", "--noheader", f"--name={JOB_NAME}",  # live jobs only
                     "--format=%i|%T|%r|%k"], timeout=timeout, env=submit_env())
    jobs = []
    for line in out.splitlines():
        parts = line.strip().split("|", 3)
        if len(parts) != 4:
            continue
        job_id, state, reason, text = parts
        m = _TAG.fullmatch(text.strip())
        if not m or (session and m["session"] != session):
            continue
        jobs.append(TaggedJob(job_id, state, reason, m["session"],
                              KernelRef(m["host"], int(m["pid"]), int(m["start"]))))
    return jobs


def cancel(job_ids, timeout: float = 20) -> None:
    ids = [j for j in job_ids if SLURM_JOB_ID.fullmatch(j)]
    if ids:
        slurm.run(["scancel", *ids], timeout=timeout, env=submit_env())


def cancel_kernel_jobs(session: str, kernel: KernelRef) -> list[str]:
    ids = [j.job_id for j in list_jobs(session) if j.kernel == kernel]
    cancel(ids)
    return ids


def sweep(session: str, *, everything: bool = False) -> list[str]:
    """Cancel the session's jobs whose kernel is gone (or all of them); returns their ids."""
    ids = [j.job_id for j in list_jobs(session) if everything or not j.kernel.alive()]
    cancel(ids)
    return ids


# ------------------------------------------------------------------ the per-kernel watchdog
def start_watchdog(session: str, kernel: KernelRef) -> subprocess.Popen:
    """Start the watchdog for this process. Closing its stdin (or writing to it) tells it the
    kernel is done; it cancels the kernel's jobs and exits."""
    return subprocess.Popen(
        [sys.executable, "-m", "aifab.extension.dask_jobs", "watch", "--session", session,
         "--pid", str(kernel.pid), "--start", str(kernel.start)],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # a signal to the kernel's process group spares it
        env=submit_env(), close_fds=True)


class _Stop(Exception):
    pass


def _raise_stop(*_):
    raise _Stop


def _watch(session: str, pid: int, start: int) -> int:
    kernel = KernelRef(this_host(), pid, start)
    # SIGTERM/SIGHUP (the session ending) interrupt the wait: cancel, then exit
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGHUP, _raise_stop)
    try:
        pidfd = os.pidfd_open(pid)
    except (OSError, AttributeError):  # no pidfd (old kernel): poll the process instead
        pidfd = None
    try:
        watched = [sys.stdin] + ([pidfd] if pidfd is not None else [])
        while kernel.alive():
            ready, _, _ = select.select(watched, [], [], None if pidfd is not None else 0.5)
            if ready:  # the kernel exited, or closed/wrote our stdin: its clusters are done
                break
    except _Stop:
        pass
    # from here on a second signal (the session's teardown) must not interrupt the cancel
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    for attempt in range(4):  # slurmctld may be briefly unreachable: retry, never give up fast
        try:
            cancel_kernel_jobs(session, kernel)
            return 0
        except slurm.SlurmError:
            time.sleep(2 ** attempt)
    return 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aifab.extension.dask_jobs")
    sub = parser.add_subparsers(dest="command", required=True)
    watch = sub.add_parser("watch", help="cancel a kernel's dask jobs when it exits")
    watch.add_argument("--session", required=True)
    watch.add_argument("--pid", type=int, required=True)
    watch.add_argument("--start", type=int, required=True)
    sweep_p = sub.add_parser("sweep", help="cancel this session's jobs whose kernel is gone")
    sweep_p.add_argument("--all", action="store_true", help="cancel every job of the session")
    args = parser.parse_args(argv)
    if args.command == "watch":
        return _watch(args.session, args.pid, args.start)
    for job_id in sweep(session_key(), everything=args.all):
        print(f"cancelled {job_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
