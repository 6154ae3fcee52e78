"""The ``slurm`` backend: batchspawner's SlurmSpawner, made safe and quick.

We keep batchspawner's model (sbatch a script that runs the single-user server, poll
squeue, learn the port from the job) and replace the parts the field has learned to fear:

* every Slurm command is an argv list through one choke point (batchspawner builds shell
  strings, with the user name in them);
* the batch script is a pure function of the *validated* placement (batchspawner merges
  ``user_options`` into the template variables, so a REST caller could set the prologue);
* the start-up and stop waits back off with jitter from 0.1 s (jupyterhub's
  exponential_backoff) instead of polling in lock-step at a fixed 0.5 s, and progress says
  why a job waits (Slurm's reason: Resources, Priority, ...);
* all the hub's sessions share one ``squeue`` per round (see slurm_poller): a class of 100
  is not 100 controller calls per poll interval;
* batchspawner's settings that this spawner would ignore (``req_*``, ``batch_script``, the
  command strings, the state regexes) are refused when set (see batchspawner_settings).
"""

from __future__ import annotations

import asyncio
import pwd
import random
import re
import shlex
import time

from batchspawner import SlurmSpawner
from batchspawner.batchspawner import JobStatus
from jupyterhub.utils import exponential_backoff
from traitlets import Bool, Float, List, Unicode, default

from aifab import slurm
from aifab.names import ENV_NAME, HOSTNAME, SLURM_JOB_ID
from aifab.session import (
    ENV_IMAGE,
    ENV_SLURM_ACCOUNT,
    ENV_SLURM_JOB_ID,
    ENV_SLURM_PARTITION,
    ENV_SLURM_RESERVATION,
    ENV_WALLTIME_END,
)
from aifab.walltime import format_walltime

from . import metrics
from .batchspawner_settings import SlurmConfigError, check_config, slurm_sections
from .options import Placement
from .profiles import SlurmSettings
from .slurm_poller import INVALID_JOB, JobLine, Unknown, shared_poller

# "%T %r %B": state, reason, batch host. Host is "n/a"/"(null)" while pending.
SQUEUE_FORMAT = "%T %r %B"
SESSION_COMMENT = "aifab-session"
# squeue's long state names (what %T prints)
# (a requeued or preempted job comes back to the queue; a suspended one still holds its node)
PENDING_STATES = re.compile(r"^(?:PENDING|CONFIGURING|REQUEUED|REQUEUE_HOLD|REQUEUE_FED|"
                            r"RESIZING|PREEMPTED)\b")
RUNNING_STATES = re.compile(r"^(?:RUNNING|COMPLETING|SUSPENDED|STOPPED|SIGNALING|STAGE_OUT)\b")
# what squeue says when the controller does not answer: the job may well be running
CONTROLLER_TROUBLE = re.compile(r"^slurm_load_jobs error: (?:Socket timed out on send/recv|"
                                r"Unable to contact slurm controller)")
STOP_WAIT_S = 10  # how long stop() waits for the job to leave squeue after scancel
PORT_CHECK_S = 2.0  # while waiting for the port: squeue this often (+-25% jitter)

# the error every Slurm command raises (the old name, kept for code that imports it)
SlurmCommandError = slurm.SlurmError

__all__ = ["SlurmCommandError", "SlurmConfigError", "SlurmSessionSpawner",
           "configure_slurm_child", "gres_for", "render_batch_script"]


metrics.register()  # the hub's /hub/metrics shows its Slurm commands


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
        f'export {ENV_SLURM_JOB_ID}="$SLURM_JOB_ID"',
        # the allocation's end, as the session will see it (the job starts now)
        f"export {ENV_WALLTIME_END}=$(( $(date +%s) + {int(placement.walltime_s)} ))",
    ]
    # where the session runs, so that jobs it submits (dask workers) go to the same place
    for name, value in ((ENV_SLURM_PARTITION, settings.partition),
                        (ENV_SLURM_ACCOUNT, settings.account),
                        (ENV_SLURM_RESERVATION, settings.reservation)):
        if value:
            lines.append(f"export {name}={shlex.quote(value)}")
    if placement.image_ref:
        lines.append(f"export {ENV_IMAGE}={shlex.quote(placement.image_ref)}")
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

    shared_poll = Bool(
        True,
        help="""Serve every Slurm session of this hub from one squeue per round (all the hub's
        jobs in one --jobs list) instead of one squeue per session, as batchspawner does.""",
    ).tag(config=True)

    shared_poll_prefix = List(
        Unicode(),
        default_value=[],
        help="""argv run before the shared squeue. It lists the jobs of all users, so it runs
        as one identity, the hub's own by default (squeue shows other users' jobs unless the
        site sets PrivateData=jobs; then give it an account that may see them).""",
    ).tag(config=True)

    shared_poll_gap = Float(
        1.0,
        help="""Least seconds between two shared squeue rounds (with +-25% jitter), however
        many sessions ask; doubled per failed round while slurmctld does not answer, up to
        shared_poll_max_backoff.""",
    ).tag(config=True)

    shared_poll_max_backoff = Float(
        60.0, help="Most seconds between two shared squeue rounds while slurmctld is down."
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
        # spawners/singleuser.py); any batchspawner-compatible wrapper works here
        return "aifab-singleuser"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # batchspawner's req_*, batch_script, command strings: set, but ignored here
        check_config(self.config, slurm_sections(type(self)))

    # ------------------------------------------------------------ the one choke point
    async def _call(self, argv: list[str], stdin: str | None = None,
                    env: dict | None = None) -> str:
        """A Slurm command as the user (``submit_prefix``), through :func:`aifab.slurm.arun`.

        ``env`` is what the job gets (sbatch --export names it), on top of what a Slurm
        client needs to find its cluster; never the hub's own environment (its secrets).
        """
        prefix = [a.replace("{username}", self.user.name) for a in self.submit_prefix]
        return await slurm.arun(argv, stdin=stdin, timeout=self.command_timeout,
                                env=slurm.minimal_env(env), prefix=prefix)

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
        # off the hub's loop: the script needs the user's home (an NSS lookup, which may ask
        # LDAP over the network) and is rendered from the placement
        script = await asyncio.get_running_loop().run_in_executor(None, self.batch_script_text)
        env = self.get_env()
        # sbatch reads the script on stdin; values reach the job through the environment
        # (--export names them), so no token is ever written into the script or a log.
        out = await self._call(["sbatch", "--parsable"], stdin=script, env=env)
        job_id = out.splitlines()[-1].split(";")[0] if out else ""
        if not SLURM_JOB_ID.fullmatch(job_id):
            raise RuntimeError(f"sbatch printed no job id: {out!r}")
        self.job_id = job_id
        self.log.info("Submitted Slurm job %s for %s", job_id, self._log_name)
        return job_id

    def _poller(self):
        return shared_poller(prefix=self.shared_poll_prefix, min_gap=self.shared_poll_gap,
                             max_backoff=self.shared_poll_max_backoff,
                             timeout=self.command_timeout, logger=self.log)

    job_line: JobLine | None = None  # this job's line in the shared answer
    on_queued = None  # called once when the job waits in Slurm's queue (PlacementSpawner)

    async def query_job_status(self, max_age: float | None = None):
        """The job's state from the shared poller's answer (at most ``max_age`` seconds old;
        a start-up's short gap by default); a job that answer does not list is checked
        once by its own id before it is called gone."""
        if not self.job_id:
            self.job_status = ""
            return JobStatus.NOTFOUND
        if self.shared_poll:
            try:
                line = await self._poller().line(
                    self.job_id, self.shared_poll_gap if max_age is None else max_age)
            except Unknown as exc:
                self.job_status = str(exc)
                return JobStatus.UNKNOWN
            self.job_line = line
            if line is not None:
                self.job_status = f"{line.state} {line.reason} {line.node}"
                return self._status_of_line()
        return await self._query_own_job()

    async def _query_own_job(self):
        try:
            self.job_status = await self._call(
                ["squeue", "-h", "-j", self.job_id, "-o", SQUEUE_FORMAT]
            )
        except slurm.SlurmError as exc:
            if exc.returncode == 1 and INVALID_JOB.search(exc.stderr):
                self.job_status = ""  # Slurm's own answer: the job is gone
                return JobStatus.NOTFOUND
            # anything else (a timeout, a controller or munge that is down, a hub out of file
            # descriptors) says nothing about the job: it may well run
            self.job_status = f"squeue failed: {(exc.stderr or str(exc)).strip()[-200:]}"
            return JobStatus.UNKNOWN
        return self._status_of_line()

    def _status_of_line(self):
        if self.state_isrunning():
            return JobStatus.RUNNING
        if self.state_ispending():
            return JobStatus.PENDING
        if self.state_isunknown():
            return JobStatus.UNKNOWN
        return JobStatus.NOTFOUND

    async def poll(self):
        # the hub polls every poll_interval: an answer that old is as good as a new squeue
        status = await self.query_job_status(max_age=self.poll_interval)
        if status in (JobStatus.PENDING, JobStatus.RUNNING, JobStatus.UNKNOWN):
            return None
        self.clear_state()
        return 1

    def clear_state(self):
        if self.job_id and self.shared_poll:
            try:
                self._poller().forget(self.job_id)
            except RuntimeError:  # no running event loop (the hub loading state): nothing held
                pass
        super().clear_state()
        self.job_line = None

    async def cancel_batch_job(self):
        if self.job_id:
            self.log.info("Cancelling Slurm job %s of %s", self.job_id, self._log_name)
            await self._call(["scancel", self.job_id])

    async def _cancel_quietly(self) -> None:
        """scancel before forgetting a job (it may still be listed, or about to start)."""
        try:
            await self.cancel_batch_job()
        except slurm.SlurmError as exc:
            self.log.info("scancel of job %s: %s", self.job_id, exc)

    # squeue's answer, read by aifab (batchspawner's state_*_re settings are refused)
    def state_ispending(self) -> bool:
        return bool(PENDING_STATES.match(self.job_status))

    def state_isrunning(self) -> bool:
        return bool(RUNNING_STATES.match(self.job_status))

    def state_isunknown(self) -> bool:
        return bool(CONTROLLER_TROUBLE.match(self.job_status))

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

        async def running() -> bool:
            status = await self.query_job_status()
            if status == JobStatus.RUNNING:
                return True
            if status == JobStatus.PENDING and self.on_queued is not None:
                self.on_queued()  # the hub's start line: Slurm sets the pace from here
                self.on_queued = None
            if status not in (JobStatus.PENDING, JobStatus.UNKNOWN):
                job, last = self.job_id, self.job_status
                await self._cancel_quietly()
                self.clear_state()
                raise RuntimeError(
                    f"Slurm job {job} ended before the server started ({last or 'gone'}); "
                    "see the job's log file"
                )
            return False

        # squeue with full jitter, from startup_poll_interval up to 2 s: a hundred sessions
        # started together do not poll the controller in lock-step. The hub cancels this
        # start at start_timeout; the backoff's own deadline is only a backstop.
        await exponential_backoff(
            running, f"Slurm job {self.job_id} did not start within {self.start_timeout} s",
            start_wait=self.startup_poll_interval, scale_factor=1.5, max_wait=2.0,
            timeout=self.start_timeout + 60,
        )
        self.ip = self.state_gethost()
        next_check = time.monotonic() + PORT_CHECK_S * random.uniform(0.75, 1.25)
        while self.port == 0:  # the job reports its port through the hub API
            await asyncio.sleep(0.05)
            if time.monotonic() > next_check:
                next_check = time.monotonic() + PORT_CHECK_S * random.uniform(0.75, 1.25)
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
            if self.state_ispending():
                msg = self.queue_message()
                if msg != last:
                    yield {"progress": 30, "message": msg}
                    last = msg
            elif self.job_id and self.job_status and not self.state_isrunning():
                msg = "Slurm does not answer at the moment; the job is kept, and asked again"
                if msg != last:
                    yield {"progress": 30, "message": msg}
                    last = msg
            elif self.state_isrunning():
                host = self.state_gethost() if self.job_status else ""
                yield {"progress": 60,
                       "message": f"Job {self.job_id} starting on node {host}; "
                                  "waiting for the server"}
                return
            await asyncio.sleep(0.2)

    def queue_message(self) -> str:
        """What a waiting user reads: Slurm's reason, its start estimate, and how many of the
        hub's sessions wait before this one."""
        msg = f"Job {self.job_id} queued ({self.job_reason() or 'waiting'})"
        line = self.job_line
        if line is not None and line.estimated_start:
            msg += f"; Slurm expects it to start at {line.estimated_start.replace('T', ' ')}"
        ahead = self._poller().pending_before(self.job_id) if self.shared_poll else None
        if ahead:
            msg += (f"; {ahead} session{'s' if ahead > 1 else ''} of this hub "
                    f"{'are' if ahead > 1 else 'is'} waiting before yours")
        return msg

    async def stop(self, now=False):
        if not self.job_id:
            return
        await self.cancel_batch_job()
        if now:
            return

        async def gone() -> bool:
            return await self.query_job_status() not in (
                JobStatus.RUNNING, JobStatus.UNKNOWN, JobStatus.PENDING)

        try:
            await exponential_backoff(gone, "still listed", start_wait=0.2, scale_factor=1.5,
                                      max_wait=2.0, timeout=STOP_WAIT_S)
        except asyncio.TimeoutError:
            self.log.warning("Slurm job %s still listed %s s after scancel", self.job_id,
                             STOP_WAIT_S)

    def state_gethost(self):
        parts = self.job_status.split()
        host = parts[-1] if len(parts) >= 3 else ""
        if not HOSTNAME.fullmatch(host):
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
