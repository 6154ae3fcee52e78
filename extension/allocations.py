"""Slurm allocations the session holds: requested, watched while they queue, held, released.

An allocation is one Slurm job that holds its nodes (``sleep infinity`` as its batch step);
work runs in it as ``srun --overlap --jobid=ID`` steps (the pattern SkyPilot uses on Slurm).
It is recorded like a service (one JSON file per allocation in the session's state folder),
so a restarted Jupyter server finds it again; the session's end cancels it; one nobody uses
(no step of its own running) for ``idle_timeout`` seconds is released.

Every request is checked against the hub's allowances (``AIFAB_ALLOCATABLE``, see
``aifab.allocation``) here, on the server; every Slurm command goes through ``aifab.slurm``.
Nothing is extended silently: the walltime asked for is the walltime held.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from aifab import slurm
from aifab.allocation import Allowance, check_request
from aifab.api import Conflict, NotFound

JOB_NAME = "aifab-alloc"
# the provisioner's kernel steps are named aifab-kernel-<this server's instance>-<kernel>: a
# restarted server ends the steps of earlier instances (it cannot reach them), never its own
KERNEL_STEP_PREFIX = "aifab-kernel-"
KERNEL_STEP = KERNEL_STEP_PREFIX + uuid.uuid4().hex[:12]
# squeue fields: id, state, reason, nodes, expected start, partition, priority
SQUEUE_FORMAT = "%i|%T|%r|%N|%S|%P|%Q"
LIVE_STATES = ("queued", "running", "releasing")
# Slurm's states of a job that has ended for good (anything else may still hold the nodes:
# REQUEUED, SUSPENDED, RESIZING, ... stay watched)
TERMINAL = re.compile(r"^(?:COMPLETED|CANCELLED|FAILED|TIMEOUT|NODE_FAIL|BOOT_FAIL|DEADLINE|"
                      r"OUT_OF_MEMORY|PREEMPTED|SPECIAL_EXIT|REVOKED)$")
PENDING = re.compile(r"^(?:PENDING|CONFIGURING)$")
RUNNING = re.compile(r"^(?:RUNNING|COMPLETING|SUSPENDED)$")
# a line of `squeue -t PD -o %i|%Q`: job id (123, 123_4, 123+0) and priority
PENDING_ROW = re.compile(r"(?P<job>(?P<first>\d+)(?:[_+]\d+)?)\|(?P<priority>\d+)")
USER_STEP = re.compile(r"^\d+\.\d+$")  # 123.0, 123.1: not 123.batch or 123.extern


@dataclass
class Allocation:
    name: str
    job_id: str
    request: dict
    state: str = "queued"  # queued, running, releasing, released, ended
    reason: str = ""  # Slurm's, while queued: Resources, Priority, ...
    nodes: list[str] = field(default_factory=list)
    estimated_start: str = ""  # Slurm's estimate while queued (squeue --start), ISO time
    position: int | None = None  # among the pending jobs of its partition, by priority
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None
    last_used: float | None = None  # the last time one of its own steps was seen running
    steps: int = 0
    message: str = ""
    release_as: str = ""  # while "releasing": the state it ends in once scancel succeeds

    def public(self) -> dict:
        return asdict(self)

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES


class AllocationManager:
    def __init__(self, state_dir: Path, session_key: str, allowances: list[Allowance],
                 log: logging.Logger, *, idle_timeout: float = 1800, poll: float = 15.0,
                 queued_poll: float = 2.0, command_timeout: float = 30.0):
        self.dir = Path(state_dir) / "allocations"
        self.session_key = session_key
        self.allowances = allowances
        self.log = log
        self.idle_timeout = idle_timeout
        self.poll, self.queued_poll = poll, queued_poll
        self.command_timeout = command_timeout
        self.allocations: dict[str, Allocation] = {}
        self._monitor: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self._refresh_lock = asyncio.Lock()

    # ------------------------------------------------------------ records
    def _path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def _save(self, alloc: Allocation) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self._path(alloc.name).with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(alloc.public(), f)
        os.replace(tmp, self._path(alloc.name))

    def adopt(self) -> None:
        """What an earlier server of this session allocated (the monitor checks it)."""
        if not self.dir.is_dir():
            return
        for path in sorted(self.dir.glob("*.json")):
            try:
                alloc = Allocation(**json.loads(path.read_text()))
            except (ValueError, TypeError) as exc:
                self.log.warning("aifab: unreadable allocation record %s: %s", path, exc)
                continue
            self.allocations[alloc.name] = alloc

    def get(self, name: str) -> Allocation:
        if name not in self.allocations:
            known = ", ".join(self.allocations) or "none"
            raise NotFound(f"no allocation {name!r} in this session (it has: {known})")
        return self.allocations[name]

    # ------------------------------------------------------------ requests
    async def create(self, raw: object) -> Allocation:
        request = check_request(raw, self.allowances)
        async with self._lock:
            old = self.allocations.get(request.name)
            if old is not None and old.live:
                raise Conflict(f"allocation {request.name!r} is {old.state} (job {old.job_id});"
                               " release it first or choose another name")
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            comment = f"{JOB_NAME};session={self.session_key};name={request.name}"
            argv = ["sbatch", "--parsable", f"--job-name={JOB_NAME}", f"--comment={comment}",
                    f"--output={self.dir / request.name}-%j.log", f"--chdir={self.dir}",
                    # a requeued job would run again with nobody watching it
                    "--no-requeue",
                    *request.sbatch_args(),
                    # holds the nodes until released or its walltime; work runs as steps
                    "--wrap=exec sleep infinity"]
            try:
                out = await slurm.arun(argv, timeout=self.command_timeout)
            except slurm.SlurmError as exc:
                raise Conflict(f"Slurm refused the allocation: {_slurm_message(exc)}") from None
            job_id = out.splitlines()[-1].split(";")[0].strip() if out else ""
            if not re.fullmatch(r"[0-9]{1,12}", job_id):
                raise Conflict(f"sbatch printed no job id: {out!r}")
            alloc = Allocation(name=request.name, job_id=job_id, request=request.to_dict())
            self.allocations[alloc.name] = alloc
            self._save(alloc)
        self.log.info("aifab: allocation %s is Slurm job %s", alloc.name, job_id)
        await self.refresh()
        return alloc

    async def release(self, name: str) -> Allocation:
        alloc = self.get(name)
        if alloc.live:
            await self._cancel(alloc, "released")
        return alloc

    async def _cancel(self, alloc: Allocation, state: str, message: str = "") -> None:
        try:
            await slurm.arun(["scancel", alloc.job_id], timeout=self.command_timeout)
        except slurm.SlurmError as exc:
            if not (exc.returncode == 1 and "Invalid job id" in exc.stderr):
                # not cancelled: keep watching it, and try again at the next round
                self.log.warning("aifab: scancel of allocation %s (job %s): %s; will retry",
                                 alloc.name, alloc.job_id, exc)
                alloc.state, alloc.message = "releasing", f"{state}: {message or 'asked'}; " \
                    f"scancel failed ({str(exc)[-200:]}), retrying"
                alloc.release_as = state
                self._save(alloc)
                return
        alloc.state, alloc.ended_at, alloc.message = state, time.time(), message
        alloc.nodes, alloc.position, alloc.reason = [], None, ""
        self._save(alloc)

    async def shutdown(self) -> None:
        """The session ends: every allocation it holds goes with it."""
        if self._monitor is not None:
            self._monitor.cancel()
        live = [a for a in self.allocations.values() if a.live]
        await asyncio.gather(*(self._cancel(a, "released", "the session ended") for a in live))

    # ------------------------------------------------------------ watching
    async def refresh(self) -> None:
        """One squeue for the session's live allocations (and one per partition that has a
        queued one, for its place in line); the idle ones are released. One at a time."""
        async with self._refresh_lock:
            await self._refresh()

    async def _refresh(self) -> None:
        live = [a for a in self.allocations.values() if a.live]
        if not live:
            return
        argv = ["squeue", "-h", f"--jobs={','.join(a.job_id for a in live)}",
                "-o", SQUEUE_FORMAT]
        try:
            out = await slurm.arun(argv, timeout=self.command_timeout)
        except slurm.SlurmError as exc:
            if not (exc.returncode == 1 and "Invalid job id" in exc.stderr):
                self.log.warning("aifab: squeue for allocations: %s", exc)
                return  # nothing known: keep what we had
            out = ""
        rows = {r[0]: r for r in (line.split("|") for line in out.splitlines())
                if len(r) == 7}
        now = time.time()
        for alloc in live:
            if not alloc.live:  # released while squeue ran: the release stands
                continue
            row = rows.get(alloc.job_id)
            if alloc.state == "releasing":
                if row is None or TERMINAL.match(row[1]):
                    alloc.state, alloc.ended_at = alloc.release_as or "released", now
                    alloc.nodes, alloc.position = [], None
                    self._save(alloc)
                else:
                    await self._cancel(alloc, alloc.release_as or "released", alloc.message)
                continue
            if row is None:
                alloc.state, alloc.ended_at = "ended", now
                alloc.message = alloc.message or "its job left the queue (walltime or scancel)"
                alloc.nodes, alloc.position = [], None
            elif PENDING.match(row[1]):
                alloc.state, alloc.reason = "queued", row[2]
                alloc.estimated_start = row[4] if re.fullmatch(
                    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", row[4]) else ""
            elif RUNNING.match(row[1]):
                if alloc.state != "running":
                    alloc.started_at = now
                alloc.state, alloc.reason, alloc.position = "running", "", None
                alloc.nodes = expand_nodes(row[3])
            elif TERMINAL.match(row[1]):
                alloc.state, alloc.ended_at, alloc.message = "ended", now, row[1]
            # any other state (REQUEUED, SUSPENDED, ...): as it was, watched
            self._save(alloc)
        await self._queue_positions([a for a in live if a.state == "queued"], rows)
        await self._release_idle([a for a in live if a.state == "running"], now)

    async def _queue_positions(self, queued: list[Allocation], rows: dict) -> None:
        for partition in {rows[a.job_id][5] for a in queued}:
            try:
                out = await slurm.arun(["squeue", "-h", "-t", "PD", "-p", partition,
                                        "-o", "%i|%Q"], timeout=self.command_timeout)
            except slurm.SlurmError:
                continue
            # Slurm starts the pending jobs of a partition by priority (then by id); an array
            # or het job's id (123_4, 123+0) sorts by its first number; other lines are skipped
            pending = [m for m in map(PENDING_ROW.fullmatch, out.splitlines()) if m]
            order = [m["job"] for m in sorted(
                pending, key=lambda m: (-int(m["priority"]), int(m["first"])))]
            for a in queued:
                if rows[a.job_id][5] == partition and a.job_id in order:
                    a.position = order.index(a.job_id) + 1
                    self._save(a)

    async def _release_idle(self, running: list[Allocation], now: float) -> None:
        if not running:
            return
        try:
            jobs = ",".join(a.job_id for a in running)
            out = await slurm.arun(["squeue", "-h", "-s", f"--jobs={jobs}", "-o", "%i"],
                                   timeout=self.command_timeout)
        except slurm.SlurmError:
            return
        steps: dict[str, int] = {}
        for step in out.split():
            if USER_STEP.fullmatch(step):
                job = step.split(".")[0]
                steps[job] = steps.get(job, 0) + 1
        for alloc in running:
            alloc.steps = steps.get(alloc.job_id, 0)
            if alloc.steps:
                alloc.last_used = now
            since = alloc.last_used or alloc.started_at or now
            if self.idle_timeout and not alloc.steps and now - since >= self.idle_timeout:
                self.log.info("aifab: releasing allocation %s (job %s): unused for %.0f s",
                              alloc.name, alloc.job_id, now - since)
                await self._cancel(alloc, "released",
                                   f"released: nothing ran in it for {self.idle_timeout:.0f} s")
            else:
                self._save(alloc)

    async def end_orphan_kernels(self) -> None:
        """Kernel steps an earlier server of this session started in its allocations: a new
        server cannot reach them (Jupyter does not carry kernels over a restart), and they
        would keep an allocation busy for nobody. Named ``aifab-kernel`` by the provisioner."""
        live = [a.job_id for a in self.allocations.values() if a.state == "running"]
        if not live:
            return
        try:
            out = await slurm.arun(["squeue", "-h", "-s", f"--jobs={','.join(live)}",
                                    "-o", "%i|%j"], timeout=self.command_timeout)
        except slurm.SlurmError as exc:
            self.log.warning("aifab: could not list the allocations' steps: %s", exc)
            return
        orphans = [step for step, name in (line.split("|", 1) for line in out.splitlines()
                                           if "|" in line)
                   if name.startswith(KERNEL_STEP_PREFIX) and not name.startswith(KERNEL_STEP)
                   and USER_STEP.fullmatch(step)]
        if orphans:
            self.log.info("aifab: ending kernel steps of an earlier server: %s",
                          ", ".join(orphans))
            try:
                await slurm.arun(["scancel", *orphans], timeout=self.command_timeout)
            except slurm.SlurmError as exc:
                self.log.warning("aifab: scancel of %s: %s", ", ".join(orphans), exc)

    def start_monitor(self) -> None:
        async def watch():
            try:
                await self.refresh()
                await self.end_orphan_kernels()
            except Exception:  # the monitor must outlive one bad answer
                self.log.exception("aifab: allocation monitor (first round)")
            while True:
                try:
                    await self.refresh()
                except Exception:  # the monitor must outlive one bad answer
                    self.log.exception("aifab: allocation monitor")
                queued = any(a.state == "queued" for a in self.allocations.values())
                await asyncio.sleep(self.queued_poll if queued else self.poll)

        self._monitor = asyncio.ensure_future(watch())


def expand_nodes(nodelist: str) -> list[str]:
    """Slurm's compact node list (nid[001-002],gpu7) as host names, without scontrol."""
    if nodelist in ("", "(null)", "n/a"):
        return []
    out = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
        prefix, ranges = m.group(1), m.group(2)
        if not ranges:
            out.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                out.append(f"{prefix}{i:0{len(lo)}d}")
    return out


def _slurm_message(exc: slurm.SlurmError) -> str:
    text = (exc.stderr or exc.stdout or str(exc)).strip().splitlines()
    return text[-1].removeprefix("sbatch: error: ") if text else str(exc)
