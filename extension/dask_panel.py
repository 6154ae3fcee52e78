"""The session's dask clusters as the JupyterLab panel shows them.

A cluster lives in a kernel (``aifab.cluster()``), not in this server: the kernel tells the
server about it (``PUT /aifab/api/dask/ID`` when it is made and whenever it is scaled,
``DELETE`` when it is closed). The server adds what the kernel cannot keep current by itself:

* running workers: the scheduler's own count (``/json/counts.json`` of its dashboard, which
  listens on 127.0.0.1 of the kernel's host);
* pending workers with Slurm's reason: the session's tagged worker jobs in ``squeue`` (one
  call for all clusters, at most every ``SQUEUE_EVERY`` seconds, and only while a Slurm
  cluster is registered: a hundred open panels must not poll Slurm).

A registration whose kernel has died (on this host) is dropped: a ``kill -9`` never says
goodbye. Routes, behind the Jupyter server's authentication:

    GET    /aifab/api/dask          the clusters, with requested / pending / running
    PUT    /aifab/api/dask/ID       a kernel registers or updates its cluster
    DELETE /aifab/api/dask/ID       a kernel's cluster was closed
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import asdict, dataclass

from tornado import web
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from aifab import slurm
from aifab.api import BadRequest

from . import dask_jobs
from .handlers import AifabAPIHandler

CLUSTER_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
BACKENDS = ("slurm", "local", "kubernetes")
SQUEUE_EVERY = 10.0  # seconds between squeue calls, however many panels ask
MAX_CLUSTERS = 64  # registrations per session: a runaway loop in a kernel must not grow us


@dataclass
class Registration:
    id: str
    name: str
    backend: str
    requested: int
    processes_per_job: int
    dashboard_port: int | None
    kernel: dask_jobs.KernelRef
    registered_at: float

    @classmethod
    def from_body(cls, cluster_id: str, body) -> Registration:
        """A kernel's registration, checked field by field. Raises BadRequest."""
        if not isinstance(body, dict):
            raise BadRequest("expected a JSON object: name, backend, requested, "
                             "processes_per_job, dashboard_port, kernel")
        allowed = {"name", "backend", "requested", "processes_per_job", "dashboard_port",
                   "kernel"}
        if unknown := sorted(set(body) - allowed):
            raise BadRequest(f"{', '.join(unknown)}: not a field; allowed: "
                             f"{', '.join(sorted(allowed))}")
        name = body.get("name", "")
        if not isinstance(name, str) or not re.fullmatch(r"[\w.:/ -]{0,200}", name):
            raise BadRequest(f"name {name!r}: up to 200 letters, digits and . : / - _")
        backend = body.get("backend")
        if backend not in BACKENDS:
            raise BadRequest(f"backend {backend!r}: one of {', '.join(BACKENDS)}")
        requested = _integer(body, "requested", 0, 100_000)
        per_job = _integer(body, "processes_per_job", 1, 1024, default=1)
        port = body.get("dashboard_port")
        if port is not None:
            port = _integer(body, "dashboard_port", 1, 65535)
        kernel = body.get("kernel")
        try:
            ref = dask_jobs.KernelRef(str(kernel["host"]), int(kernel["pid"]),
                                      int(kernel["start"]))
            if not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", ref.host):
                raise ValueError(ref.host)
        except (TypeError, KeyError, ValueError):
            raise BadRequest("kernel: {host, pid, start} of the kernel that owns the "
                             "cluster") from None
        return cls(cluster_id, name, backend, requested, per_job, port, ref, time.time())


def _integer(body: dict, key: str, low: int, high: int, default: int | None = None) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"{key}={value!r}: an integer from {low} to {high}")
    return value


class DaskClusters:
    def __init__(self, session_key: str, log):
        self.session_key = session_key
        self.log = log
        self.clusters: dict[str, Registration] = {}
        self._jobs: list[dask_jobs.TaggedJob] = []
        self._jobs_note = ""
        self._jobs_at = 0.0
        self._jobs_lock = asyncio.Lock()

    def register(self, reg: Registration) -> None:
        if reg.id not in self.clusters and len(self.clusters) >= MAX_CLUSTERS:
            self._prune()
            if len(self.clusters) >= MAX_CLUSTERS:
                raise BadRequest(f"this session has {MAX_CLUSTERS} dask clusters registered; "
                                 "close some first")
        self.clusters[reg.id] = reg

    def unregister(self, cluster_id: str) -> None:
        self.clusters.pop(cluster_id, None)

    def _prune(self) -> None:
        """Drop clusters whose kernel died on this host (elsewhere we cannot tell: kept)."""
        here = dask_jobs.this_host()
        for cid, reg in list(self.clusters.items()):
            if reg.kernel.host == here and not reg.kernel.alive():
                del self.clusters[cid]

    async def overview(self) -> list[dict]:
        self._prune()
        regs = list(self.clusters.values())
        jobs, note = ([], "")
        if any(r.backend == "slurm" for r in regs):
            jobs, note = await self._slurm_jobs()
        running = await asyncio.gather(*(self._running(r) for r in regs))
        out = []
        for reg, workers in zip(regs, running, strict=True):
            # (a kernel's Slurm jobs: a local cluster of the same kernel has none; two Slurm
            # clusters in one kernel share its tag, and so its jobs, in this view)
            mine = [j for j in jobs if j.kernel == reg.kernel] if reg.backend == "slurm" else []
            pending = [j for j in mine if j.state in ("PENDING", "CONFIGURING")]
            reasons = sorted({j.reason for j in pending if j.reason and j.reason != "None"})
            d = asdict(reg)
            d.pop("kernel")
            here = reg.kernel.host == dask_jobs.this_host()
            d.update(running=workers,
                     # relative to the server's base URL, through jupyter-server-proxy: only
                     # for a kernel on this host (the proxy reaches this host's 127.0.0.1)
                     dashboard_path=(f"proxy/{reg.dashboard_port}/status"
                                     if here and reg.dashboard_port else ""),
                     pending=len(pending) * reg.processes_per_job,
                     pending_reasons=reasons, jobs_queued=len(mine),
                     slurm_note=note if reg.backend == "slurm" else "",
                     kernel_host=reg.kernel.host)
            out.append(d)
        return out

    async def _running(self, reg: Registration) -> int | None:
        """Workers connected to the scheduler, as it counts them; None when it cannot say
        (no dashboard, or the kernel is on another host, whose 127.0.0.1 we cannot reach)."""
        if not reg.dashboard_port or reg.kernel.host != dask_jobs.this_host():
            return None
        url = f"http://127.0.0.1:{reg.dashboard_port}/json/counts.json"
        try:
            response = await AsyncHTTPClient().fetch(url, request_timeout=3)
            workers = json.loads(response.body).get("workers")
        except (HTTPClientError, OSError, ValueError, AttributeError):
            return None
        return workers if isinstance(workers, int) else None

    async def _slurm_jobs(self) -> tuple[list[dask_jobs.TaggedJob], str]:
        async with self._jobs_lock:  # one squeue for all the panels that ask at once
            if time.monotonic() - self._jobs_at >= SQUEUE_EVERY:
                try:
                    self._jobs = await asyncio.get_running_loop().run_in_executor(
                        None, dask_jobs.list_jobs, self.session_key)
                    self._jobs_note = ""
                except slurm.SlurmError as exc:
                    self._jobs_note = f"Slurm did not answer: {exc}"
                self._jobs_at = time.monotonic()
            return self._jobs, self._jobs_note


class _Base(AifabAPIHandler):
    @property
    def clusters(self) -> DaskClusters:
        return self.settings["aifab_dask"]


class DaskClustersHandler(_Base):
    @web.authenticated
    async def get(self) -> None:
        self.finish(json.dumps(await self.clusters.overview()))


class DaskClusterHandler(_Base):
    @web.authenticated
    def put(self, cluster_id: str) -> None:
        try:
            reg = Registration.from_body(cluster_id, self.json_body())
            self.clusters.register(reg)
        except BadRequest as exc:
            self.fail(exc)
        self.finish(json.dumps({"id": cluster_id}))

    @web.authenticated
    def delete(self, cluster_id: str) -> None:
        self.clusters.unregister(cluster_id)
        self.set_status(204)
        self.finish()


def handlers() -> list[tuple]:
    return [(r"/aifab/api/dask", DaskClustersHandler),
            (rf"/aifab/api/dask/(?P<cluster_id>{CLUSTER_ID.pattern})", DaskClusterHandler)]
