"""The server extension as a Jupyter ExtensionApp: it owns the session's ServiceManager,
adopts what a previous server of this session left running, and stops every service when the
server shuts down."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

from jupyter_core.paths import jupyter_data_dir
from jupyter_server.extension.application import ExtensionApp
from traitlets import Dict, Float, Unicode, default

from aifab import slurm
from aifab.allocation import allowances_from_env
from aifab.api import LIVE
from aifab.session import ENV_ALLOCATABLE, ENV_STATE_DIR, Session

from . import activity, dask_jobs
from .allocations import AllocationManager
from .dask_panel import DaskClusters
from .services import ServiceManager


def session_id(session: Session) -> str:
    """Services belong to one session: one Slurm job, one pod, or one local server user."""
    if session.slurm_job_id:
        return f"slurm-{session.slurm_job_id}"
    if session.pod_name:
        return f"pod-{session.pod_name}"
    user = os.environ.get("JUPYTERHUB_USER") or str(os.getuid())
    server = os.environ.get("JUPYTERHUB_SERVER_NAME", "")
    return f"local-{socket.gethostname()}-{user}" + (f"-{server}" if server else "")


class AifabExtension(ExtensionApp):
    name = "aifab"
    load_other_extensions = True

    state_dir = Unicode(
        help="Where the session's service records, logs and caches live (default: "
             "$AIFAB_STATE_DIR, else JUPYTER_DATA_DIR/aifab/sessions/<session>).",
    ).tag(config=True)
    stop_grace = Float(10.0, help="Seconds a service has to exit after SIGTERM.").tag(config=True)
    ready_timeout = Float(900.0, help="Seconds a service may take to become ready.").tag(
        config=True)

    allocation_idle_timeout = Float(
        1800.0,
        help="""Seconds a Slurm allocation of the session may hold its nodes with nothing
        running in it (no step of its own) before it is released; 0 never releases one.""",
    ).tag(config=True)
    allocation_poll = Float(
        15.0, help="Seconds between two looks at the session's running allocations (2 s "
                   "while one queues).",
    ).tag(config=True)

    extra_service_kinds = Dict(
        key_trait=Unicode(), value_trait=Unicode(),
        help="""Service kinds besides vllm and finetune: {kind: "package.module:Class"}, each a
        subclass of aifab.extension.kinds.ServiceKind. A kind builds its own command line;
        this is the only way a program other than vLLM or the trainer becomes a service.""",
    ).tag(config=True)

    @default("state_dir")
    def _state_dir_default(self):
        if os.environ.get(ENV_STATE_DIR):
            return os.environ[ENV_STATE_DIR]
        return str(Path(jupyter_data_dir()) / "aifab" / "sessions" /
                   session_id(Session.from_env()))

    def initialize_settings(self):
        session = Session.from_env()
        # the allocations first: a service may run --on one of them
        self.allocations = AllocationManager(
            Path(self.state_dir), dask_jobs.session_key(),
            allowances_from_env(os.environ.get(ENV_ALLOCATABLE)), self.log,
            idle_timeout=self.allocation_idle_timeout, poll=self.allocation_poll)
        self.allocations.adopt()
        self.settings["aifab_allocations"] = self.allocations
        self.manager = ServiceManager(Path(self.state_dir), session, self.log,
                                      stop_grace=self.stop_grace,
                                      ready_timeout=self.ready_timeout,
                                      kinds=self.extra_service_kinds,
                                      allocations=self.allocations)
        self.manager.adopt()
        self.settings["aifab_services"] = self.manager
        self._allocation_kernel_specs()
        self.settings["aifab_dask"] = DaskClusters(dask_jobs.session_key(), self.log)
        # a stepping run and a proxied request are activity for the hub (its idle culler)
        self.activity = activity.install(self, self.manager)
        self._sweep_dask_jobs(everything=False)

    def initialize_handlers(self):
        from . import allocation_handlers, dask_panel, publishing
        from .handlers import handlers

        self.handlers.extend(handlers() + allocation_handlers.handlers()
                             + dask_panel.handlers() + publishing.handlers())

    async def _start_jupyter_server_extension(self, serverapp):
        # the monitor runs on the server's event loop, which exists by now
        self.manager.start_monitor()
        if self.allocations.allocations or self.allocations.allowances:
            self.allocations.start_monitor()
        self.activity.start()
        from .handlers import quiet_polls

        settings = serverapp.web_app.settings
        settings["log_function"] = quiet_polls(settings.get("log_function"), self.log)
        # Slurm warns a job of its walltime with SIGUSR1 to the batch shell (the server, see
        # the spawner's --signal=B:USR1@300): runs get it too and checkpoint; Jupyter's own
        # SIGUSR1 handler (it prints its state) still runs.
        previous = signal.getsignal(signal.SIGUSR1)

        def on_usr1(signum, frame):
            self.manager.forward_signal(signum)
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGUSR1, on_usr1)
        # JupyterHub's local spawners stop a server with SIGINT first. Without a terminal,
        # Jupyter leaves SIGINT to Python (KeyboardInterrupt): the event loop just ends and no
        # extension is stopped, so a vLLM would outlive its session. Treat it as SIGTERM is
        # treated: a clean stop, services included.
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, serverapp._signal_stop)

    def _allocation_kernel_specs(self) -> None:
        """A kernel spec per Slurm profile the session may allocate: JupyterLab's launcher
        starts a kernel on the allocation's node while this server stays where it is."""
        if not self.allocations.allowances:
            return
        from . import provisioner

        provisioner.use_manager(self.allocations)
        folder = Path(self.state_dir) / "kernels"
        provisioner.install_specs(folder, provisioner.kernel_specs(
            self.allocations.allowances, sys.executable))
        ksm = self.serverapp.kernel_spec_manager
        if str(folder) not in ksm.kernel_dirs:
            ksm.kernel_dirs.append(str(folder))

    def _sweep_dask_jobs(self, everything: bool) -> None:
        """Cancel the dask worker jobs of this session whose kernel is gone (at start: what
        earlier servers' kernels left) or all of them (at the end of the session)."""
        if self.manager.session.backend != "slurm" or not slurm.have_client():
            # only a Slurm session's clusters submit worker jobs (elsewhere aifab.cluster() is
            # a LocalCluster): a local session never asks squeue, which may hang when a
            # configured controller is down
            return
        try:
            cancelled = dask_jobs.sweep(dask_jobs.session_key(), everything=everything)
        except slurm.SlurmError as exc:
            self.log.warning("aifab: could not sweep dask worker jobs: %s", exc)
            return
        if cancelled:
            self.log.info("aifab: cancelled dask worker jobs %s", ", ".join(cancelled))

    async def _withdraw_published(self) -> None:
        """The session ends: its publications leave the models gateway (a gateway that does
        not answer in 10 s finds them unhealthy through its router's checks instead)."""
        from .publishing import withdraw

        published = [s for s in self.manager.services.values() if s.published]
        if not published:
            return
        try:
            done = await asyncio.wait_for(asyncio.gather(
                *(withdraw(s) for s in published), return_exceptions=True), 10)
        except asyncio.TimeoutError:
            self.log.warning("aifab: the models gateway did not answer the withdrawals")
            return
        for result in done:
            if isinstance(result, Exception):
                self.log.warning("aifab: withdrawing a published model failed: %s", result)

    async def stop_extension(self):
        self.log.info("aifab: server stopping; stopping the session's services")
        self.activity.stop()
        await self._withdraw_published()
        # runs in an allocation first, so that they checkpoint before its job is cancelled
        # (Slurm would give them only its KillWait); then the rest and the allocations
        # together: a grace period may end this server before the services' stops are done
        on_allocations = [n for n, s in self.manager.services.items()
                          if s.status in LIVE and s.slurm_step]
        if on_allocations:
            stops = asyncio.gather(*(self.manager.stop(n) for n in on_allocations),
                                   return_exceptions=True)
            try:
                await asyncio.wait_for(stops, 90)
            except asyncio.TimeoutError:
                self.log.warning("aifab: runs in allocations still stopping after 90 s")
        await asyncio.gather(self.allocations.shutdown(), self.manager.shutdown())
        self._sweep_dask_jobs(everything=True)
