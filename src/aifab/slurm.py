"""The one way this project runs a Slurm command: an argv list, a deadline, a clear error.

Modelled on dask-jobqueue's ``Job._call``. Everything that runs ``sbatch``, ``squeue``,
``scancel`` ... goes through :func:`run` (sync) or :func:`arun` (asyncio); no other program
goes through here, and nothing here builds a shell string.

* the child gets :func:`minimal_env` unless the caller passes one: never the caller's
  secrets (a hub's API token, a cloud key) in a process a user may own;
* a failure is a :class:`SlurmError` that carries the argv, the exit code, stdout and
  stderr; a command that took too long is killed and is a SlurmError whose ``returncode``
  is None; a missing Slurm client is returncode 127 with a message saying so;
* :data:`calls` counts the commands made, per command, for tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import collections
import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence

COMMANDS = ("sbatch", "squeue", "scancel", "scontrol", "sinfo", "srun", "sacct", "salloc")

# what a Slurm client needs from the environment to find its cluster and its credentials
_ENV_KEEP = ("PATH", "LANG", "SLURM_CONF", "MUNGE_SOCKET")

# commands made since import, per command: tests and benchmarks read (and may clear) it
calls: collections.Counter = collections.Counter()


class SlurmError(RuntimeError):
    """A Slurm command failed: it exited non-zero, timed out, or is not installed."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stdout: str = "",
                 stderr: str = "", *, timeout: float | None = None,
                 missing: str | None = None):
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        cmd = shlex.join(self.argv)
        if returncode is None:
            after = f" after {timeout:g}s" if timeout is not None else ""
            message = f"{cmd} timed out{after}"
        elif missing is not None and missing not in COMMANDS:  # the prefix's program (sudo)
            message = f"{cmd}: {missing} not found"
        elif returncode == 127 and not stdout and not stderr:
            message = f"{cmd} not found: is the Slurm client installed?"
        else:
            message = f"{cmd} exited {returncode}: {(stderr or stdout).strip()[-500:]}"
        super().__init__(message)

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def minimal_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """PATH, LANG and what Slurm needs to find its cluster (SLURM_CONF, MUNGE_SOCKET), from
    this process's environment; ``extra`` on top. Nothing else of the caller's."""
    env = {k: os.environ[k] for k in _ENV_KEEP if k in os.environ}
    if extra:
        env.update(extra)
    return env


def client_configured(env: Mapping[str, str] = os.environ) -> bool:
    """Whether Slurm commands can find a cluster here. Without a configuration a Slurm client
    goes looking for one in DNS (configless mode), slowly, and fails."""
    return bool(env.get("SLURM_CONF") or os.path.exists("/etc/slurm/slurm.conf")
                or env.get("SLURM_JOB_ID"))


def have_client() -> bool:
    """A Slurm client is on PATH and knows its cluster."""
    return shutil.which("squeue") is not None and client_configured()


def _argv(argv: Sequence[str], prefix: Sequence[str]) -> list[str]:
    if isinstance(argv, (str, bytes)):
        raise TypeError("a Slurm command is an argv list, not a string")
    argv = [str(a) for a in argv]
    if not argv or argv[0] not in COMMANDS:
        raise ValueError(
            f"{argv[0] if argv else '(empty argv)'!r} is not a Slurm command; "
            f"aifab.slurm runs only {', '.join(COMMANDS)}"
        )
    calls[argv[0]] += 1
    return [str(p) for p in prefix] + argv


def run(argv: Sequence[str], *, timeout: float = 30.0, stdin: str | None = None,
        env: Mapping[str, str] | None = None, prefix: Sequence[str] = ()) -> str:
    """Run a Slurm command; its stdout, stripped. SlurmError when it fails.

    The command runs in a session of its own: at the deadline the whole process group is
    killed (a ``sudo`` prefix does not pass SIGKILL on to the command it runs).
    """
    full = _argv(argv, prefix)
    try:
        proc = subprocess.Popen(
            full, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, errors="replace", env=dict(minimal_env() if env is None else env),
            start_new_session=True,
        )
    except FileNotFoundError:
        raise SlurmError(full, 127, missing=full[0]) from None
    except OSError as exc:  # not executable, ...: what the shell calls 126
        raise SlurmError(full, 126, stderr=str(exc)) from None
    try:
        out, err = proc.communicate(stdin if stdin is not None else "", timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        try:
            out, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:  # something outside the group holds the pipes
            out, err = "", ""
        raise SlurmError(full, None, out, err, timeout=timeout) from None
    except BaseException:
        _kill_group(proc)
        proc.wait()
        raise
    if proc.returncode != 0:
        raise SlurmError(full, proc.returncode, out, err)
    return out.strip()


async def arun(argv: Sequence[str], *, timeout: float = 30.0, stdin: str | None = None,
               env: Mapping[str, str] | None = None, prefix: Sequence[str] = ()) -> str:
    """:func:`run` for asyncio: the command's process group is killed at its deadline or
    on cancellation."""
    full = _argv(argv, prefix)
    try:
        proc = await asyncio.create_subprocess_exec(
            *full, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=dict(minimal_env() if env is None else env),
            start_new_session=True,
        )
    except FileNotFoundError:
        raise SlurmError(full, 127, missing=full[0]) from None
    except OSError as exc:
        raise SlurmError(full, 126, stderr=str(exc)) from None
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(stdin.encode() if stdin is not None else None), timeout
        )
    except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
        _kill_group(proc)
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except asyncio.TimeoutError:  # something outside the group holds the pipes
            pass
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise SlurmError(full, None, timeout=timeout) from None
    if proc.returncode != 0:
        raise SlurmError(full, proc.returncode, out.decode(errors="replace"),
                         err.decode(errors="replace"))
    return out.decode(errors="replace").strip()


def _kill_group(proc) -> None:
    """SIGKILL the command's process group (it leads its own session), or at least it.
    The group may outlive its leader (a child of sudo's still holding the pipes)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            proc.kill()
        except ProcessLookupError:
            pass


def _text(data) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data
