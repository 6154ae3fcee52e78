"""Session services: the long-lived processes of a session (vLLM servers, fine-tune runs,
...), owned by the Jupyter server rather than a kernel.

``ServiceManager`` holds the records (one folder each, ``STATE/NAME``), hands GPUs out through
the ledger, starts what a kind planned as a process tree of its own (``aifab.supervisor``),
watches it until it ends, and stops the whole tree. A restarted server adopts what the last
one left running; a second server of the same session is refused (a lock).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from aifab import supervisor
from aifab.api import LIVE, BadRequest, Conflict, NotFound, Status
from aifab.names import SERVICE_NAME, SERVICE_NAME_RULE
from aifab.session import Session

from .kinds import BUILTIN, KindContext, ServiceKind, load_kind
from .ledger import allocate
from .records import Service, tail


class ServiceManager:
    def __init__(self, state_dir: Path, session: Session, log, python: str = sys.executable,
                 stop_grace: float = 10.0, ready_timeout: float = 900.0,
                 kinds: Mapping[str, str | type[ServiceKind]] | None = None,
                 allocations=None):
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # one manager per session: a second server of the same session must not adopt (and
        # later stop) what this one runs. The lock goes with the process, even on kill -9.
        self._lock = open(self.state_dir / ".lock", "w")  # noqa: SIM115 - held for life
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RuntimeError(f"another Jupyter server of this session already manages its "
                               f"services ({self.state_dir}/.lock is held)") from None
        self.session = session
        self.log = log
        self.stop_grace = stop_grace
        self.ready_timeout = ready_timeout
        ctx = KindContext(session=session, state_dir=self.state_dir, python=python,
                          environ=os.environ, allocations=allocations)
        self.kinds: dict[str, ServiceKind] = {}
        for name, kind in {**BUILTIN, **(kinds or {})}.items():
            cls = load_kind(kind) if isinstance(kind, str) else kind
            self.kinds[name] = cls(ctx)
        self.services: dict[str, Service] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self._monitor: asyncio.Task | None = None

    # ------------------------------------------------------------ lookups
    def kind_of(self, svc: Service) -> ServiceKind | None:
        return self.kinds.get(svc.kind)

    def get(self, name: str) -> Service:
        svc = self.services.get(name)
        if svc is None:
            known = ", ".join(sorted(self.services)) or "none"
            raise NotFound(f"no service named {name!r} (services: {known})")
        return svc

    def held(self) -> dict[str, list[str]]:
        """The ledger's input: the GPUs each live service holds (derived from the records,
        so it cannot drift: a service that ends stops holding its GPUs)."""
        return {n: s.gpus for n, s in self.services.items() if s.status in LIVE and s.gpus}

    # ------------------------------------------------------------ adopt
    def adopt(self) -> None:
        """Find the services a previous server of this session left running."""
        for record in sorted(self.state_dir.glob("*/record.json")):
            try:
                svc = Service.load(record)
            except (OSError, ValueError, TypeError) as exc:
                self.log.warning("aifab: unreadable service record %s: %s", record, exc)
                continue
            kind = self.kind_of(svc)
            if svc.status in LIVE:
                if supervisor.is_same(svc.pid, svc.started):
                    self.log.info("aifab: found running service %r (pid %s)", svc.name, svc.pid)
                elif kind is not None and (outcome := kind.outcome(svc)):
                    svc.status, svc.error = outcome  # it ended while we were down
                    svc.save()
                else:
                    self._ended(svc)
                    svc.status = Status.FAILED
                    svc.error = "exited while the Jupyter server was down"
                    svc.save()
            self.services[svc.name] = svc

    # ------------------------------------------------------------ create
    def validate(self, spec) -> tuple[ServiceKind, object]:
        """Check a request without starting anything: (kind, typed request). Reads files (and
        once runs vLLM's --help): call it off the event loop when ``needs_slow_validation``."""
        if not isinstance(spec, dict):
            raise BadRequest("expected a JSON object with kind, name and the kind's fields")
        kind_name = spec.get("kind", "vllm")
        kind = self.kinds.get(kind_name) if isinstance(kind_name, str) else None
        if kind is None:
            raise BadRequest(f"kind {kind_name!r}: allowed are {', '.join(self.kinds)}")
        name = spec.get("name")
        if not name and kind.one_shot:
            pass  # a run may name itself from its model (the kind checks the name it makes)
        elif not isinstance(name, str) or not SERVICE_NAME.fullmatch(name):
            raise BadRequest(f"name {name!r}: {SERVICE_NAME_RULE}")
        return kind, kind.validate(spec)

    def needs_slow_validation(self, spec) -> bool:
        name = spec.get("kind", "vllm") if isinstance(spec, dict) else None
        kind = self.kinds.get(name) if isinstance(name, str) else None
        return bool(kind and kind.is_slow(spec))

    def create(self, spec, checked: tuple[ServiceKind, object] | None = None) -> Service:
        kind, request = checked or self.validate(spec)
        name = getattr(request, "name", "") or spec.get("name")
        if not isinstance(name, str) or not SERVICE_NAME.fullmatch(name):
            # (never an empty name: its folder would be the state folder itself)
            raise BadRequest(f"name {name!r}: {SERVICE_NAME_RULE}")
        old = self.services.get(name)
        if old is not None and old.status in LIVE:
            raise Conflict(f"a service named {name!r} is already {old.status}; stop it first "
                           "or choose another name")
        gpus = allocate(kind.default_gpus(request), kind.gpu_pool(request), self.held())
        svc_dir = self.state_dir / name
        if svc_dir.exists():
            shutil.rmtree(svc_dir)  # a stopped or failed service of the same name
        for sub in ("", "cache", "tmp"):
            (svc_dir / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        api_key = secrets.token_urlsafe(24)
        try:
            plan = kind.plan(request, name=name, gpus=gpus, service_dir=svc_dir,
                             api_key=api_key)
        except BaseException:
            shutil.rmtree(svc_dir, ignore_errors=True)
            raise
        svc = Service(name=name, kind=kind.name, argv=plan.argv, gpus=gpus, port=plan.port,
                      api_key=api_key, dir=str(svc_dir), model=plan.model,
                      served_name=plan.served_name, output=plan.output, socket=plan.socket,
                      loras=plan.loras, request=plan.request, slurm_step=plan.slurm_step,
                      tls=plan.tls, host=plan.host)
        try:
            proc, svc.started = supervisor.launch(plan.argv, env=plan.env,
                                                  log_path=svc.log_path, cwd=svc_dir)
        except OSError as exc:
            shutil.rmtree(svc_dir, ignore_errors=True)
            plan.discard()
            raise BadRequest(f"cannot start {plan.argv[0]!r}: {exc.strerror}") from None
        svc.pid = proc.pid
        self._procs[name] = proc
        self.services[name] = svc
        svc.save()
        self.log.info("aifab: started %s service %r (pid %s) on GPUs [%s]", kind.name, name,
                      proc.pid, ",".join(gpus))
        return svc

    def resume_request(self, name: str) -> dict:
        """The request that continues an ended run (POST it through validate and create)."""
        svc = self.get(name)
        if svc.status in LIVE:
            raise Conflict(f"{name!r} is {svc.status}: stop it before resuming it")
        kind = self.kind_of(svc)
        if kind is None:
            raise BadRequest(f"{name!r}: its kind {svc.kind!r} is not configured any more")
        return kind.resume_request(svc)

    # ------------------------------------------------------------ stop
    async def stop(self, name: str) -> Service:
        svc = self.get(name)
        if svc.status in LIVE:
            svc.status = Status.STOPPING  # the watcher leaves it alone during the grace period
            await self._stop_tree(svc)
            svc.status = Status.STOPPED
            kind = self.kind_of(svc)
            outcome = kind.outcome(svc) if kind is not None else None
            if outcome and outcome[1]:
                svc.error = outcome[1]  # a run says what it left: "a checkpoint was saved"
            svc.save()
            self.log.info("aifab: stopped service %r", name)
        return svc

    async def _stop_tree(self, svc: Service) -> None:
        kind = self.kind_of(svc)
        # a run saving its checkpoint (optimizer state included) needs longer than a server
        grace = self.stop_grace * (6 if kind is not None and kind.one_shot else 1)
        first = kind.stop_signal(svc) if kind is not None else signal.SIGTERM
        await supervisor.stop_tree(svc.pid, svc.started, grace=grace, first=first,
                                   reap=lambda: self._reap(svc.name))
        self._ended(svc)

    def _ended(self, svc: Service) -> None:
        """What a service leaves behind goes: its group's leftovers, its runtime folder."""
        supervisor.kill_leftovers(svc.pid, svc.started)
        kind = self.kind_of(svc)
        if kind is not None:
            kind.ended(svc)
        self._procs.pop(svc.name, None)

    def _reap(self, name: str) -> None:
        proc = self._procs.get(name)
        if proc is not None and proc.poll() is not None:
            self._procs.pop(name, None)

    async def stop_all(self) -> None:
        results = await asyncio.gather(*(self.stop(n) for n, s in list(self.services.items())
                                         if s.status in LIVE), return_exceptions=True)
        for r in results:
            if isinstance(r, Exception):
                self.log.error("aifab: stopping a service failed: %s", r)

    # ------------------------------------------------------------ watching
    def start_monitor(self) -> None:
        self._monitor = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while True:
            for svc in list(self.services.values()):
                if svc.status.running:
                    try:
                        await self.check(svc)
                    except Exception:  # keep watching the others
                        self.log.exception("aifab: checking service %r failed", svc.name)
            # while something starts, notice "ready" quickly; otherwise a slower watch will do
            starting = any(s.status == Status.STARTING for s in self.services.values())
            await asyncio.sleep(0.25 if starting else 1.0)

    async def check(self, svc: Service) -> None:
        """One look at a running service: has it ended, is it ready, is it too slow?"""
        proc = self._procs.get(svc.name)
        alive = supervisor.is_same(svc.pid, svc.started)
        if proc is not None and proc.poll() is not None:
            alive = False
        kind = self.kind_of(svc)
        if not alive:
            self._exited(svc, proc, kind)
            return
        if svc.status != Status.STARTING or kind is None or kind.one_shot:
            return  # a run is "starting" until it exits: finished, or failed/interrupted
        svc.phase = kind.phase(svc)
        if await kind.ready(svc) and svc.status == Status.STARTING:  # (a stop may have come)
            svc.status, svc.phase, svc.ready_at = Status.READY, "ready", time.time()
            svc.save()
        elif svc.status == Status.STARTING and \
                time.time() - svc.started_at > self.ready_timeout:
            await self._stop_tree(svc)
            svc.status = Status.FAILED
            svc.error = f"not ready after {self.ready_timeout:.0f}s"
            svc.save()

    def _exited(self, svc: Service, proc, kind: ServiceKind | None) -> None:
        if proc is not None:
            svc.exit_code = proc.returncode
        last = tail(svc.log_path, 15)
        # a one-shot service that ends well is finished; anything else that ends failed
        svc.status = Status.FINISHED if svc.exit_code == 0 else Status.FAILED
        outcome = kind.outcome(svc) if kind is not None else None
        if outcome:
            svc.status, svc.error = outcome
        elif svc.exit_code != 0:
            svc.error = ((f"exited (code {svc.exit_code})" if svc.exit_code is not None
                          else "exited") + (": " + last[-1] if last else ""))
        # whatever it left behind in its group goes too; its GPUs are free again
        self._ended(svc)
        svc.save()
        if svc.status == Status.FINISHED:
            self.log.info("aifab: service %r finished", svc.name)
        else:
            self.log.warning("aifab: service %r %s: %s", svc.name, svc.status, svc.error)

    def forward_signal(self, signum: int) -> None:
        """Pass a signal (SIGUSR1: the walltime is near) on to every running one-shot
        service, its workers included, so each saves a checkpoint."""
        for svc in self.services.values():
            kind = self.kind_of(svc)
            if kind is not None and kind.one_shot and svc.status.running:
                supervisor.signal_tree(svc.pid, signum)
                self.log.info("aifab: passed signal %s on to run %r", signum, svc.name)

    async def shutdown(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
        await self.stop_all()
