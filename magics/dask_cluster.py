"""``aifab.cluster()``: a dask cluster that fits the session.

* Slurm session: a ``dask_jobqueue.SLURMCluster`` whose worker jobs go where the session's job
  runs (partition, account, reservation), never outlive it (walltime capped to what the session
  has left), carry the session's tag (see :mod:`aifab.extension.dask_jobs`), talk TLS to the
  scheduler and hold no GPU unless asked (``gpus_per_worker``).
* Local session (this machine, the demo): a ``distributed.LocalCluster`` on 127.0.0.1.
* Kubernetes session: a ``LocalCluster`` inside the pod, unless the site names a cluster class
  in the dask config key ``aifab.kubernetes-cluster`` (e.g. dask-kubernetes' ``KubeCluster``).

Settings are layered the way dask users expect: the site's dask config (``jobqueue.slurm.*`` in
``/etc/dask`` or ``~/.config/dask``) < the session < keyword arguments. An unknown or invalid
keyword is refused with a message naming it and what is allowed; nothing is submitted then.
In every case the scheduler's dashboard listens on 127.0.0.1 and is linked through the Jupyter
server's proxy (``<server>/proxy/<port>/status``), so it opens from a browser behind the hub.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import os
import socket
import time
from pathlib import Path

import dask
from dask.utils import parse_bytes
from dask_jobqueue import SLURMCluster
from dask_jobqueue.core import Job, JobQueueCluster
from dask_jobqueue.slurm import SLURMJob
from distributed import LocalCluster, SpecCluster
from distributed.deploy.adaptive import Adaptive

from aifab import walltime
from aifab.extension import dask_jobs
from aifab.names import SLURM_NAME
from aifab.session import ENV_DASK_INTERFACE, Session

DEFAULT_CORES = 2
DEFAULT_MEMORY = "8GiB"
DEFAULT_WALLTIME = "01:00:00"  # when the site's dask config gives none
# a worker job ends this long before the session does, so the session never waits on it
WALLTIME_MARGIN_S = 120
# what aifab sets itself: tagging and placement must not be overridden by accident
_RESERVED = {"job_name": "worker jobs are named and tagged by aifab so they can be cleaned up",
             "name": "aifab names the cluster",
             "config_name": "aifab uses the site's 'slurm' dask-jobqueue config",
             "job_cls": "aifab's job class keeps secrets out of the worker jobs",
             "loop": "not supported from a notebook", "asynchronous": "not supported here",
             "scheduler_cls": "not supported here"}
_RESERVED_DIRECTIVES = ("--comment", "--job-name", "-J", "--time", "-t")
_NOT_WITH_LOCAL = ("queue", "account", "walltime", "job_extra_directives", "gpus_per_worker",
                   "reservation")


class ClusterOptionError(ValueError):
    """A keyword of aifab.cluster() is unknown or invalid; nothing was started."""


def cluster(*, workers: int = 0, on: str = "", **overrides):
    """A dask cluster for this session, with ``workers`` worker processes requested now.

    Slurm keywords are dask-jobqueue's ``SLURMCluster`` ones (cores, memory, processes, walltime,
    queue, account, job_extra_directives, interface, ...) plus ``reservation`` and
    ``gpus_per_worker``. On this machine, LocalCluster's (threads_per_worker, memory_limit, ...).
    ``on=ALLOC``: the workers run as steps of that allocation of the session, whatever the
    session's own placement (cores, memory, processes, interface; see dask_allocation).
    """
    _check_count("workers", workers)
    if on:
        from .dask_allocation import AllocationCluster

        return AllocationCluster.for_allocation(on, workers=workers, **overrides)
    session = Session.from_env()
    if session.backend == "slurm":
        return SessionSLURMCluster.for_session(session, workers=workers, **overrides)
    if session.backend == "kubernetes":
        site_class = dask.config.get("aifab.kubernetes-cluster", None)
        if site_class:
            from dask.utils import import_term

            return import_term(site_class)(n_workers=workers, **overrides)
    return _local_cluster(workers, overrides)


# ----------------------------------------------------------------------------- Slurm
def _slurm_keywords() -> set[str]:
    names: set[str] = set()
    for fn in (JobQueueCluster.__init__, SLURMJob.__init__, Job.__init__):
        names |= {p.name for p in inspect.signature(fn).parameters.values()
                  if p.kind is p.POSITIONAL_OR_KEYWORD or p.kind is p.KEYWORD_ONLY}
    names -= {"self", "scheduler", "n_workers", "job_cls", "env_extra", "job_extra", "extra",
              "project"} | set(_RESERVED)
    return names | {"reservation", "gpus_per_worker", "workers"}


def _refuse_unknown(given, allowed: set[str], what: str) -> None:
    for key in given:
        if key in _RESERVED:
            raise ClusterOptionError(f"aifab.cluster(): {key!r} cannot be set: {_RESERVED[key]}")
        if key not in allowed:
            near = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ClusterOptionError(
                f"aifab.cluster(): unknown option {key!r} for {what}{hint}; allowed: "
                + ", ".join(sorted(allowed)))


def _check_count(name: str, value, low: int = 0, high: int = 10_000) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ClusterOptionError(
            f"aifab.cluster(): {name}={value!r} must be a whole number from {low} to {high}")
    return value


def parse_walltime(value) -> int:
    """A walltime as Slurm reads it (aifab.walltime: "01:30" is 90 s, 90 is 90 minutes) ->
    seconds. Less than a minute is refused: dask-jobqueue passes whole minutes to Slurm."""
    try:
        seconds = walltime.parse_walltime(value)
    except ValueError as exc:
        raise ClusterOptionError(f"aifab.cluster(): walltime: {exc}") from None
    if seconds < 60:
        raise ClusterOptionError(f"aifab.cluster(): walltime={value!r} is less than a minute")
    return seconds


def cap_walltime(wanted: int, session: Session, now: float | None = None) -> int:
    """``wanted`` seconds, but ending WALLTIME_MARGIN_S before the session does."""
    left = session.walltime_left(now)
    if left is None:
        return wanted
    usable = int(left) - WALLTIME_MARGIN_S
    if usable < 60:
        raise ClusterOptionError(
            f"aifab.cluster(): the session has {int(left)} s left, too little for worker "
            f"jobs (they end {WALLTIME_MARGIN_S} s before the session)")
    return min(wanted, usable)


def format_minutes(seconds: int) -> str:
    """Whole minutes as HH:MM:00 (Slurm rounds seconds up to the minute: round down here)."""
    minutes = seconds // 60
    return f"{minutes // 60:02d}:{minutes % 60:02d}:00"


def _interfaces() -> set[str]:
    return {name for _, name in socket.if_nameindex()}


def job_of_worker(ws) -> str:
    """The job a worker belongs to: dask-jobqueue names grouped workers JOBNAME-i."""
    return str(ws.name).rsplit("-", 1)[0]


def slurm_settings(session: Session, overrides: dict, now: float | None = None) -> dict:
    """SLURMCluster keywords for this session: site dask config < session < overrides."""
    _refuse_unknown(overrides, _slurm_keywords(), "a Slurm session")
    o = dict(overrides)
    def conf(key: str):  # the site's dask config (either spelling: a-b or a_b)
        return dask.config.get(f"jobqueue.slurm.{key}", None)

    cores = _check_count("cores", o.pop("cores", conf("cores") or DEFAULT_CORES), 1, 4096)
    processes = o.pop("processes", conf("processes") or 1)
    _check_count("processes", processes, 1, cores)
    memory = o.pop("memory", conf("memory") or DEFAULT_MEMORY)
    try:
        if parse_bytes(memory) < 2**28:
            raise ValueError
    except (ValueError, TypeError):
        raise ClusterOptionError(f"aifab.cluster(): memory={memory!r} must be an amount like "
                                 "'8GiB' or '16GB' (at least 256MiB)") from None
    gpus = _check_count("gpus_per_worker", o.pop("gpus_per_worker", 0), 0, 16)

    directives = list(o.pop("job_extra_directives", conf("job-extra-directives") or []))
    for d in directives:
        if not isinstance(d, str) or not d.strip() or any(c in d for c in "\n\r\0"):
            raise ClusterOptionError(f"aifab.cluster(): job_extra_directives entry {d!r} must "
                                     "be one line of text")
        if d.split("=", 1)[0].split()[0] in _RESERVED_DIRECTIVES:
            raise ClusterOptionError(f"aifab.cluster(): {d!r} is set by aifab (worker jobs "
                                     "are tagged with the session and end before it)")
    for d in o.get("job_directives_skip") or []:
        if any(flag in str(d) for flag in ("-J", "--job-name", "--comment", "-t", "--time")):
            raise ClusterOptionError(f"aifab.cluster(): job_directives_skip {d!r}: the job "
                                     "name, comment and time are how aifab cleans up")

    place = {"queue": session.slurm_partition, "account": session.slurm_account,
             "reservation": session.slurm_reservation}
    for key in place:
        value = o.pop(key, None)
        if value is None:
            value = place[key] or conf(key) or ""
        if value and not SLURM_NAME.fullmatch(str(value)):
            raise ClusterOptionError(f"aifab.cluster(): {key}={value!r}: letters, digits and "
                                     "_.+- only")
        place[key] = value

    wanted = cap_walltime(parse_walltime(o.pop("walltime", conf("walltime") or DEFAULT_WALLTIME)),
                          session, now)

    interface = o.pop("interface", None) or conf("interface") \
        or os.environ.get(ENV_DASK_INTERFACE) or None
    if interface and interface not in _interfaces():
        raise ClusterOptionError(f"aifab.cluster(): interface={interface!r} does not exist "
                                 f"here; this node has: {', '.join(sorted(_interfaces()))}")

    kernel = dask_jobs.KernelRef.this_process()
    directives.append(f"--comment={dask_jobs.comment(dask_jobs.session_key(), kernel)}")
    if place["reservation"]:
        directives.append(f"--reservation={place['reservation']}")
    if gpus:  # a job runs `processes` workers, each with its GPUs
        directives.append(f"--gres=gpu:{gpus * processes}")

    scheduler_options = {**(conf("scheduler-options") or {}),
                         **(o.pop("scheduler_options", None) or {})}
    scheduler_options["dashboard_address"] = "127.0.0.1:0"  # reached through Jupyter only
    settings = {
        "cores": cores, "processes": processes, "memory": memory,
        "walltime": format_minutes(wanted),
        "queue": place["queue"] or None, "account": place["account"] or None,
        "job_extra_directives": directives, "interface": interface,
        "scheduler_options": scheduler_options,
        "job_name": dask_jobs.JOB_NAME,
        "shared_temp_directory": o.pop("shared_temp_directory", None)
        or conf("shared-temp-directory") or str(_private_dir("dask-tls")),
        # the workers' logs, rather than a slurm-NNN.out per job in the notebook's folder
        "log_directory": o.pop("log_directory", None) or conf("log-directory")
        or str(_private_dir("dask-logs")),
    }
    # TLS between scheduler and workers with throw-away certificates: a dask scheduler runs
    # whatever it is sent, so on a shared network nobody else may connect to it
    if "security" not in o:
        settings["security"] = True
    settings.update(o)
    return settings


def _private_dir(name: str) -> Path:
    """A folder for the workers' TLS files or logs: under the user's home (shared with the
    compute nodes on an HPC system), readable by the user only."""
    from jupyter_core.paths import jupyter_data_dir

    path = Path(jupyter_data_dir()) / "aifab" / name
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


_watchdog = None  # this kernel's watchdog (kept referenced: its stdin must stay open)


def _ensure_watchdog() -> None:
    global _watchdog
    if _watchdog is None or _watchdog.poll() is not None:
        _watchdog = dask_jobs.start_watchdog(dask_jobs.session_key(),
                                                dask_jobs.KernelRef.this_process())


class SessionSLURMJob(SLURMJob):
    """sbatch/scancel with the kernel's environment less secrets and the Slurm variables of the
    session's own job (a worker job inherits the environment sbatch runs with). Each job's
    walltime is capped again when it is made: a job added late (scale, adapt) still ends
    before the session."""

    def __init__(self, *args, walltime=None, **kwargs):
        if walltime:
            walltime = format_minutes(cap_walltime(parse_walltime(walltime),
                                                   Session.from_env()))
        super().__init__(*args, walltime=walltime, **kwargs)

    @staticmethod
    async def _call(cmd, *, shell=False, **kwargs):
        kwargs.setdefault("env", dask_jobs.submit_env())
        return await SLURMJob._call(cmd, shell=shell, **kwargs)


class JobAdaptive(Adaptive):
    """Adaptive scaling in whole jobs. With several worker processes per job, a target that is
    not a multiple of them adds a job, retires part of it (that is, all of it), and adds it
    again, forever (dask-jobqueue #498). Bounds and target here are whole jobs."""

    def __init__(self, cluster, *, processes: int = 1, **kw):
        self.processes = processes
        super().__init__(cluster, **kw)

    async def safe_target(self) -> int:
        # minimum and maximum are multiples of `processes` (see SessionSLURMCluster.adapt)
        n = await super().safe_target()
        return math.ceil(n / self.processes) * self.processes


class _SessionWidget:
    """What both of the session's cluster classes add: the notebook widget, and the
    registration that puts the cluster in the JupyterLab panel."""

    def _register(self, backend: str):
        from .cluster_registration import Registration

        self._aifab_registration = Registration(self, backend)
        self._aifab_registration.update()
        return self

    def _registration_update(self) -> None:
        registration = getattr(self, "_aifab_registration", None)
        if registration is not None:
            registration.update()

    def scale(self, *args, **kwargs):
        result = super().scale(*args, **kwargs)
        self._registration_update()  # (adapt scales up through here)
        return result

    async def scale_down(self, workers):
        # adapt retires workers through here, not through scale()
        await super().scale_down(workers)
        self._registration_update()

    def _widget(self):
        from aifab.magics.cluster_widget import ClusterWidget

        if getattr(self, "_aifab_widget", None) is None:
            self._aifab_widget = ClusterWidget(self)
        return self._aifab_widget

    def close(self, *args, **kwargs):
        result = super().close(*args, **kwargs)
        registration = getattr(self, "_aifab_registration", None)
        if registration is not None:
            registration.close()
        widget = getattr(self, "_aifab_widget", None)
        if widget is not None:  # say so now, not at the widget's next look
            widget.show_closed()
        return result


class SessionSLURMCluster(_SessionWidget, SLURMCluster):
    job_cls = SessionSLURMJob

    @classmethod
    def for_session(cls, session: Session, *, workers: int = 0, **overrides):
        return cls._started(slurm_settings(session, overrides), workers)

    @classmethod
    def _started(cls, settings: dict, workers: int, **job_kwargs):
        """The cluster from checked settings: watched, registered, ``workers`` requested."""
        _ensure_watchdog()
        self = cls(**settings, **job_kwargs)
        self.session_key = dask_jobs.session_key()
        self._register("slurm")
        if workers:
            self.scale(workers)
        return self

    @property
    def processes_per_job(self) -> int:
        return self._dummy_job.worker_processes

    def adapt(self, minimum: float = 0, maximum: float = math.inf, *,
              minimum_jobs: int | None = None, maximum_jobs: int | None = None, **kwargs):
        """Adapt between ``minimum`` and ``maximum`` workers (or ``minimum_jobs`` and
        ``maximum_jobs`` jobs) in whole jobs: the bounds are rounded to multiples of the
        processes per job (minimum up, maximum down)."""
        p = self.processes_per_job
        min_jobs = minimum_jobs if minimum_jobs is not None else math.ceil(minimum / p)
        if maximum_jobs is not None:
            max_jobs = max(min_jobs, maximum_jobs)
        elif math.isinf(maximum):
            max_jobs = math.inf
        else:
            max_jobs = max(min_jobs, int(maximum) // p)
        kwargs.pop("Adaptive", None)
        if p > 1:  # retire whole jobs, never part of one
            kwargs.setdefault("worker_key", job_of_worker)
        return SpecCluster.adapt(self, Adaptive=functools.partial(JobAdaptive, processes=p),
                                 minimum=min_jobs * p, maximum=max_jobs * p, **kwargs)

    def job_states(self) -> dict[str, tuple[str, str]]:
        """Slurm's state and reason for each queued job of this cluster."""
        ids = {str(job.job_id) for job in self.workers.values()
               if getattr(job, "job_id", None)}
        return {j.job_id: (j.state, j.reason)
                for j in dask_jobs.list_jobs(self.session_key) if j.job_id in ids}

    @property
    def requested_workers(self) -> int:
        return len(self.worker_spec) * self.processes_per_job


class SessionLocalCluster(_SessionWidget, LocalCluster):
    processes_per_job = 1

    def job_states(self) -> dict[str, tuple[str, str]]:
        return {}

    @property
    def requested_workers(self) -> int:
        return len(self.worker_spec)


# ----------------------------------------------------------------------------- local
def _local_keywords() -> set[str]:
    names = {p.name for p in inspect.signature(LocalCluster.__init__).parameters.values()
             if p.kind is p.POSITIONAL_OR_KEYWORD or p.kind is p.KEYWORD_ONLY}
    return names - {"self", "n_workers", "loop", "asynchronous", "name", "scheduler_kwargs",
                    "host", "ip", "dashboard_address"} | {"workers"}


def _local_cluster(workers: int, overrides: dict):
    for key in _NOT_WITH_LOCAL:
        if key in overrides:
            raise ClusterOptionError(
                f"aifab.cluster(): {key!r} applies to Slurm sessions; this session runs on "
                "this machine (a LocalCluster)")
    _refuse_unknown(overrides, _local_keywords(), "a local session (LocalCluster)")
    o = dict(overrides)
    o.setdefault("threads_per_worker", 1)
    # TLS even on loopback: another user of this machine must not be able to connect to the
    # scheduler (it runs what it is sent)
    o.setdefault("security", True)
    return SessionLocalCluster(n_workers=workers, host="127.0.0.1",
                               dashboard_address="127.0.0.1:0", **o)._register("local")


# ----------------------------------------------------------------------------- helpers
def dashboard_url(cluster) -> str:
    """The dashboard as a browser reaches it: through the Jupyter server's proxy."""
    port = cluster.scheduler_info.get("services", {}).get("dashboard")
    if not port:
        return ""
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX")
    if not prefix:
        try:
            from urllib.parse import urlsplit

            from .client import find_server

            prefix = urlsplit(find_server().url).path
        except Exception:  # no Jupyter server (plain IPython): the dashboard itself
            return f"http://127.0.0.1:{port}/status"
    return f"{prefix.rstrip('/')}/proxy/{port}/status"


def resources_in_use(cluster) -> tuple[int, int]:
    """(threads, memory bytes) of the connected workers."""
    workers = cluster.scheduler_info.get("workers", {}).values()
    return (sum(w.get("nthreads", 0) for w in workers),
            sum(w.get("memory_limit", 0) or 0 for w in workers))


def wait_for_workers(cluster, n: int, timeout: float = 120) -> None:
    """Wait until ``n`` workers are connected (what the widget counts as running)."""
    deadline = time.monotonic() + timeout
    while len(cluster.scheduler_info.get("workers", {})) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{n} workers did not connect within {timeout:.0f} s")
        time.sleep(0.02)


