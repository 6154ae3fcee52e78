"""The ``slurm`` backend: batchspawner's SlurmSpawner, made safe and quick.

We keep batchspawner's model (sbatch a script that runs the single-user server, poll
squeue, learn the port from the job) and replace the parts the field has learned to fear:

* every Slurm command is an argv list through one choke point (batchspawner builds shell
  strings, with the user name in them);
* the batch script is a pure function of the *validated* placement (batchspawner merges
  ``user_options`` into the template variables, so a REST caller could set the prologue);
* the start-up wait backs off from 0.1 s instead of polling at a fixed 0.5 s, and progress
  says why a job waits (Slurm's reason: Resources, Priority, ...).
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import shlex
import time

from batchspawner import SlurmSpawner
from batchspawner.batchspawner import JobStatus
from traitlets import Float, List, Unicode, default

from .options import Placement
from .profiles import SlurmSettings, format_walltime

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
JOB_ID = re.compile(r"[0-9]{1,12}")
# "%T %r %B": state, reason, batch host. Host is "n/a"/"(null)" while pending.
SQUEUE_FORMAT = "%T %r %B"
SESSION_COMMENT = "aifab-session"


class SlurmCommandError(RuntimeError):
    def __init__(self, argv: list[str], returncode: int | None, stdout: str, stderr: str):
        what = "timed out" if returncode is None else f"exited {returncode}"
        super().__init__(f"{shlex.join(argv)} {what}: {(stderr or stdout).strip()[-500:]}")
        self.argv, self.returncode, self.stdout, self.stderr = argv, returncode, stdout, stderr


def gres_for(gpus: int, settings: SlurmSettings) -> str:
    if gpus <= 0:
        return ""
    return f"gpu:{settings.gres_type}:{gpus}" if settings.gres_type else f"gpu:{gpus}"


def render_batch_script(
    placement: Placement,
    settings: SlurmSettings,
    *,
    job_name: str,
    output: str,
    workdir: str,
    export: list[str],
    command: list[str],
) -> str:
    """The sbatch script for a validated placement. Pure: same input, same script.

    Every value comes from the admin's profile or was checked by validate_options; names are
    checked again here because this is the last place before text becomes a job.
    """
    for name in export:
        if not ENV_NAME.fullmatch(name):
            raise ValueError(f"environment variable name {name!r} cannot be exported")
    for value, what in ((job_name, "job name"), (output, "output path"), (workdir, "workdir")):
        if any(c in value for c in "\n\r\0") or not value.strip():
            raise ValueError(f"{what} {value!r} must be one non-empty line")
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --output={output}",
        f"#SBATCH --chdir={workdir}",
        f"#SBATCH --export={','.join(export) if export else 'NONE'}",
        f"#SBATCH --time={format_walltime(placement.walltime_s)}",
        f"#SBATCH --cpus-per-task={placement.cpus}",
        f"#SBATCH --mem={placement.memory_gb}G",
        f"#SBATCH --comment={SESSION_COMMENT}",
        # a warning to the server 5 minutes before the walltime: fine-tune runs checkpoint
        "#SBATCH --signal=B:USR1@300",
    ]
    gres = gres_for(placement.gpus, settings)
    if gres:
        lines.append(f"#SBATCH --gres={gres}")
    for flag, value in (
        ("partition", settings.partition),
        ("account", settings.account),
        ("qos", settings.qos),
        ("reservation", settings.reservation),
        ("constraint", settings.constraint),
    ):
        if value:
            lines.append(f"#SBATCH --{flag}={value}")
    if settings.exclusive:
        lines.append("#SBATCH --exclusive")
    lines += [
        "",
        "set -euo pipefail",
        'export AIFAB_SLURM_JOB_ID="$SLURM_JOB_ID"',
        # the allocation's end, as the session will see it (the job starts now)
        f"export AIFAB_WALLTIME_END=$(( $(date +%s) + {int(placement.walltime_s)} ))",
    ]
    # where the session runs, so that jobs it submits (dask workers) go to the same place
    for name, value in (("AIFAB_SLURM_PARTITION", settings.partition),
                        ("AIFAB_SLURM_ACCOUNT", settings.account),
                        ("AIFAB_SLURM_RESERVATION", settings.reservation)):
        if value:
            lines.append(f"export {name}={shlex.quote(value)}")
    if placement.image_ref:
        lines.append(f"export AIFAB_IMAGE={shlex.quote(placement.image_ref)}")
    if settings.prologue.strip():
        lines += ["# --- site prologue (from the profile) ---", settings.prologue.rstrip(),
                  "# --- end of prologue ---"]
    # exec: the server itself receives Slurm's signals (scancel, walltime) and can save work
    lines += [f"exec {shlex.join(command)}", ""]
    return "\n".join(lines)


class SlurmSessionSpawner(SlurmSpawner):
    """batchspawner.SlurmSpawner with argv-only commands and a script from the placement."""

    submit_prefix = List(
        Unicode(),
        default_value=["sudo", "-E", "-u", "{username}"],
        help="""argv run before sbatch/squeue/scancel, '{username}' replaced by the user's
        name (already checked to be a plain Unix name). The default runs them as the user
        (the hub must be root or have matching sudo rules); [] runs them as the hub's user.""",
    ).tag(config=True)

    command_timeout = Float(30, help="Seconds a Slurm command may take.").tag(config=True)

    startup_poll_interval = Float(
        0.1, help="First interval (s) between squeue polls while starting; grows to 2 s."
    ).tag(config=True)

    job_output = Unicode(
        "{homedir}/aifab-session-%j.log",
        help="The job's log file ({homedir} and {username} expanded; %j is the job id).",
    ).tag(config=True)

    # set by PlacementSpawner before start()
    placement: Placement | None = None
    slurm_settings: SlurmSettings = SlurmSettings()

    @default("batchspawner_singleuser_cmd")
    def _bsu_default(self):
        # our launcher: reports the port like batchspawner-singleuser, ~2 s sooner (see
        # aifab/singleuser.py); any batchspawner-compatible wrapper works here
        return "aifab-singleuser"

    # ------------------------------------------------------------ the one choke point
    async def _call(self, argv: list[str], stdin: str | None = None,
                    env: dict | None = None) -> str:
        full = [a.replace("{username}", self.user.name) for a in self.submit_prefix] + argv
        if env is None:
            # never the hub's own environment (its secrets) in a process the user owns
            env = {k: os.environ[k] for k in ("PATH", "LANG", "SLURM_CONF") if k in os.environ}
        proc = await asyncio.create_subprocess_exec(
            *full, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env,
        )
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(stdin.encode() if stdin else None), self.command_timeout
            )
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise SlurmCommandError(full, None, "", "") from None
        if proc.returncode != 0:
            raise SlurmCommandError(full, proc.returncode, out.decode(), err.decode())
        return out.decode().strip()

    # ------------------------------------------------------------ batchspawner's hooks
    def _homedir(self) -> str:
        try:
            return pwd.getpwnam(self.user.name).pw_dir
        except KeyError:
            raise RuntimeError(
                f"user {self.user.name!r} has no account on this machine; Slurm sessions run "
                "as the user's own Unix account"
            ) from None

    def batch_script_text(self) -> str:
        if self.placement is None:
            raise RuntimeError("SlurmSessionSpawner started without a validated placement")
        home = self._homedir()
        env = self.get_env()
        command = [self.batchspawner_singleuser_cmd, *self.cmd, *self.get_args()]
        return render_batch_script(
            self.placement,
            self.slurm_settings,
            job_name=f"aifab-{self.user.name}",
            output=self.job_output.format(homedir=home, username=self.user.name),
            workdir=home,
            export=sorted(env),
            command=command,
        )

    async def submit_batch_script(self):
        script = self.batch_script_text()
        env = self.get_env()
        # sbatch reads the script on stdin; values reach the job through the environment
        # (--export names them), so no token is ever written into the script or a log.
        out = await self._call(["sbatch", "--parsable"], stdin=script, env=env)
        job_id = out.splitlines()[-1].split(";")[0] if out else ""
        if not JOB_ID.fullmatch(job_id):
            raise RuntimeError(f"sbatch printed no job id: {out!r}")
        self.job_id = job_id
        self.log.info("Submitted Slurm job %s for %s", job_id, self._log_name)
        return job_id

    async def query_job_status(self):
        if not self.job_id:
            self.job_status = ""
            return JobStatus.NOTFOUND
        try:
            self.job_status = await self._call(
                ["squeue", "-h", "-j", self.job_id, "-o", SQUEUE_FORMAT]
            )
        except SlurmCommandError as exc:
            if exc.returncode is None:  # squeue timed out: we know nothing, the job may run
                self.job_status = ""
                return JobStatus.UNKNOWN
            # "Invalid job id specified" once the job is gone; controller trouble is UNKNOWN
            self.job_status = exc.stderr.strip()
        if self.state_isrunning():
            return JobStatus.RUNNING
        if self.state_ispending():
            return JobStatus.PENDING
        if self.state_isunknown():
            return JobStatus.UNKNOWN
        return JobStatus.NOTFOUND

    async def cancel_batch_job(self):
        if self.job_id:
            self.log.info("Cancelling Slurm job %s of %s", self.job_id, self._log_name)
            await self._call(["scancel", self.job_id])

    async def _cancel_quietly(self) -> None:
        """scancel before forgetting a job (it may still be listed, or about to start)."""
        try:
            await self.cancel_batch_job()
        except SlurmCommandError as exc:
            self.log.info("scancel of job %s: %s", self.job_id, exc)

    def job_reason(self) -> str:
        parts = self.job_status.split()
        return parts[1] if len(parts) >= 2 and parts[1] not in ("None", "(null)") else ""

    # ------------------------------------------------------------ start / progress
    async def start(self):
        # unlike batchspawner, keep a configured ip: the server binds there on the node
        self.port = 0
        if self.server:
            self.server.port = 0
        await self.submit_batch_script()
        interval = self.startup_poll_interval
        while True:
            status = await self.query_job_status()
            if status == JobStatus.RUNNING:
                break
            if status not in (JobStatus.PENDING, JobStatus.UNKNOWN):
                job, last = self.job_id, self.job_status
                await self._cancel_quietly()
                self.clear_state()
                raise RuntimeError(
                    f"Slurm job {job} ended before the server started ({last or 'gone'}); "
                    "see the job's log file"
                )
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, 2.0)
        self.ip = self.state_gethost()
        last_check = time.monotonic()
        while self.port == 0:  # the job reports its port through the hub API
            await asyncio.sleep(0.05)
            if time.monotonic() - last_check > 2:
                last_check = time.monotonic()
                if await self.query_job_status() not in (JobStatus.RUNNING, JobStatus.UNKNOWN):
                    job = self.job_id
                    await self._cancel_quietly()
                    self.clear_state()
                    raise RuntimeError(f"Slurm job {job} ended before its server reported a port")
        self.log.info("Slurm job %s: server on %s:%s", self.job_id, self.ip, self.port)
        return self.ip, self.port

    async def progress(self):
        placement = self.placement
        where = self.slurm_settings.partition or "the default partition"
        if placement is not None:
            gpu = f", {placement.gpus} GPU(s)" if placement.gpus else ""
            yield {"progress": 10, "message": f"Submitting to Slurm ({where}{gpu}, "
                                              f"{format_walltime(placement.walltime_s)})"}
        last = None
        while True:
            status = self.job_status.split()[0] if self.job_status else ""
            if status in ("PENDING", "CONFIGURING"):
                reason = self.job_reason() or "waiting"
                msg = f"Job {self.job_id} queued ({reason})"
                if msg != last:
                    yield {"progress": 30, "message": msg}
                    last = msg
            elif status in ("RUNNING", "COMPLETING"):
                host = self.state_gethost() if self.job_status else ""
                yield {"progress": 60,
                       "message": f"Job {self.job_id} starting on node {host}; "
                                  "waiting for the server"}
                return
            await asyncio.sleep(0.2)

    async def stop(self, now=False):
        if not self.job_id:
            return
        await self.cancel_batch_job()
        if now:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if await self.query_job_status() not in (JobStatus.RUNNING, JobStatus.UNKNOWN,
                                                     JobStatus.PENDING):
                return
            await asyncio.sleep(0.2)
        self.log.warning("Slurm job %s still listed 10 s after scancel", self.job_id)

    def state_gethost(self):
        parts = self.job_status.split()
        host = parts[-1] if len(parts) >= 3 else ""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}", host):
            raise RuntimeError(f"cannot read the job's node from squeue: {self.job_status!r}")
        return host


def configure_slurm_child(child: SlurmSessionSpawner, placement: Placement, profile) -> None:
    """Hand the child its placement and the profile's admin settings (none if the profile
    was removed since: a re-adopted job then only needs its id to be polled and stopped)."""
    child.placement = placement
    child.slurm_settings = profile.slurm if profile is not None else SlurmSettings()
    # the job's environment is exactly what --export names: give it a PATH to start from
    if "PATH" not in child.env_keep:
        child.env_keep = [*child.env_keep, "PATH", "LANG"]
