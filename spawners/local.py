"""The ``local`` backend: the session runs as a process on the hub's machine.

This is the embedded default that makes ``make demo`` work on a laptop or a fresh VM: every
user's server runs as the hub's own OS user, in a per-user directory. What the form offers is
enforced (``local_limits.py``): the CPUs and memory (a cgroup per session where the hub runs
as root) and the walltime (the session is stopped at its end, its runs checkpointing first).
It is for a demo, a workshop VM or a single-user workstation; sites place sessions with the
``slurm`` or ``kubernetes`` backends (or configure ``PlacementSpawner.local_spawner_class`` to
JupyterHub's ``LocalProcessSpawner``, which runs each user as their own Unix account).
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import subprocess
import sys
import time
from collections import Counter

from jupyterhub.spawner import LocalProcessSpawner, SimpleLocalProcessSpawner
from traitlets import Bool, default

from .local_limits import Limits, SessionCgroup, choose_cpus, enter
from .options import UNIX_USERNAME

# the CPUs each running local session of this hub holds (to spread sessions over the cores)
_CPUS_IN_USE: Counter = Counter()


class LocalSessionSpawner(SimpleLocalProcessSpawner):
    enforce_limits = Bool(
        True,
        help="""Hold a local session to the CPUs and memory its profile gave it (a cgroup of
        its own where the hub may make one, as root; else CPU affinity and a per-process
        RLIMIT_DATA), and end it at its walltime. Off, the form's CPUs, memory and walltime
        are not offered as limits at all.""",
    ).tag(config=True)

    run_as_user = Bool(
        False,
        help="""Run each hub user's session as their own Unix account, in its home (as
        JupyterHub's LocalProcessSpawner does), instead of as the hub's user. The recipe for a
        class on a shared machine: no participant can read another's files or the hub's.
        Needs a hub running as root.""",
    ).tag(config=True)

    create_users = Bool(
        False,
        help="""With run_as_user: make a missing Unix account at the user's first start
        (useradd, a home only its owner can open), as JupyterHub's local authenticators can
        with create_system_users. Hub user names must then be plain Unix names.""",
    ).tag(config=True)

    # set by PlacementSpawner before start(): the validated placement and its end
    placement = None
    walltime_end: float | None = None
    limits: Limits | None = None
    _cgroup: SessionCgroup | None = None
    _end_timer: asyncio.TimerHandle | None = None
    @default("cmd")
    def _cmd_default(self):
        # the single-user server of this very environment, not whatever PATH finds first,
        # through our launcher (it defers a slow import, see spawners/singleuser.py)
        bindir = os.path.join(sys.prefix, "bin")
        return [os.path.join(bindir, "aifab-singleuser"),
                os.path.join(bindir, "jupyterhub-singleuser")]

    @default("ip")
    def _ip_default(self):
        return "127.0.0.1"

    @default("interrupt_timeout")
    def _interrupt_timeout_default(self):
        # On Stop the server shuts down its kernels, then its services (vLLM gets SIGTERM and
        # up to AifabExtension.stop_grace before SIGKILL). JupyterHub's 10 s (+5 s after
        # SIGTERM) can SIGKILL the server half-way and leave a vLLM running on the machine;
        # on Slurm and Kubernetes the job's cgroup or the pod ends everything, here nothing
        # does. The server exits as soon as it is done, so this only bounds the worst case.
        return 60

    # ------------------------------------------------------------ limits
    def _cgroup_name(self) -> str:
        name = f"{self.user.name}-{self.name or 'default'}"
        return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:120]

    def _prepare_limits(self) -> None:
        self.limits, self._cgroup = None, None
        if not self.enforce_limits or self.placement is None:
            return
        cpus = choose_cpus(min(self.placement.cpus, len(os.sched_getaffinity(0))),
                           os.sched_getaffinity(0), _CPUS_IN_USE)
        self.limits = Limits(cpus=cpus, memory_bytes=self.placement.memory_gb * 2**30)
        if SessionCgroup.available():
            self._cgroup = SessionCgroup(self._cgroup_name())
            self._cgroup.create(self.limits)
        _CPUS_IN_USE.update(cpus)
        self.log.info("%s: %s", self._log_name,
                      self.limits.describe(cgroup=self._cgroup is not None))

    def _release_limits(self) -> None:
        if self.limits is not None:
            _CPUS_IN_USE.subtract(self.limits.cpus)
            self.limits = None
        if self._cgroup is not None:
            try:
                self._cgroup.remove()
            except OSError as exc:  # a process left in it: say so, never kill blindly
                self.log.warning("%s: cgroup %s not removed: %s", self._log_name,
                                 self._cgroup.name, exc)
            self._cgroup = None
        if self._end_timer is not None:
            self._end_timer.cancel()
            self._end_timer = None

    # ------------------------------------------------------------ whose account
    def _ensure_account(self) -> None:
        name = self.user.name
        try:
            pwd.getpwnam(name)
            return
        except KeyError:
            pass
        if not self.create_users:
            raise RuntimeError(f"user {name!r} has no Unix account on this machine, and "
                               "LocalSessionSpawner.create_users is off")
        if not UNIX_USERNAME.fullmatch(name):
            raise RuntimeError(f"user {name!r} cannot become a Unix account: lowercase "
                               "letters, digits and _ . - only, at most 32, starting with a "
                               "letter or _")
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", "--", name],
                       check=True, capture_output=True, timeout=60)
        # a home only its owner can open, whatever the machine's useradd default
        os.chmod(pwd.getpwnam(name).pw_dir, 0o700)
        self.log.info("%s: created the Unix account %s", self._log_name, name)

    @default("home_dir")
    def _home_dir_default(self):
        if self.run_as_user:
            try:
                return pwd.getpwnam(self.user.name).pw_dir
            except KeyError:  # made at the first start (create_users)
                return ""
        return self.home_dir_template.format(username=self.user.name)

    def user_env(self, env):
        if self.run_as_user:
            return LocalProcessSpawner.user_env(self, env)
        return super().user_env(env)

    def make_preexec_fn(self, name):
        if self.run_as_user:  # setuid to the user (JupyterHub's own way)
            base = LocalProcessSpawner.make_preexec_fn(self, name)
        else:
            base = super().make_preexec_fn(name)
        limits, cgroup = self.limits, self._cgroup

        def preexec():
            # the limits first: joining a cgroup needs the hub's root, which setuid gives up
            if limits is not None:
                enter(limits, cgroup)
            base()

        return preexec

    async def start(self):
        if self.run_as_user:
            await asyncio.get_running_loop().run_in_executor(None, self._ensure_account)
        self._prepare_limits()
        try:
            where = await super().start()
        except BaseException:
            self._release_limits()
            raise
        if self.enforce_limits and self.walltime_end:
            # the walltime is a real end, as on Slurm: the server stops (its runs checkpoint,
            # its services stop); the hub's next poll sees it gone
            loop = asyncio.get_running_loop()
            self._end_timer = loop.call_later(max(0.0, self.walltime_end - time.time()),
                                              lambda: asyncio.ensure_future(self._end()))
        return where

    _ending: asyncio.Future | None = None

    async def _end(self) -> None:
        self.log.info("%s: walltime reached; stopping the session", self._log_name)
        await self.stop()

    async def poll(self):
        status = await super().poll()
        if status is None and self.enforce_limits and self.walltime_end \
                and time.time() > self.walltime_end + 5 \
                and (self._ending is None or self._ending.done()):
            # after a hub restart no timer runs: the poll starts the end, once, and returns;
            # stop() polls too, so awaiting it here would recurse
            self._ending = asyncio.ensure_future(self._end())
        if status is not None:
            self._release_limits()
        return status

    async def stop(self, now=False):
        await super().stop(now=now)
        if await super().poll() is not None:
            self._release_limits()

    def get_state(self):
        state = super().get_state()
        if self.walltime_end:
            state["walltime_end"] = self.walltime_end
        return state

    def load_state(self, state):
        super().load_state(state)
        self.walltime_end = state.get("walltime_end") or self.walltime_end
        if self.pid and self.enforce_limits and SessionCgroup.available():
            # a hub restarted under a running session: its cgroup is still there, and goes
            # when the session ends
            group = SessionCgroup(self._cgroup_name())
            if any(d.exists() for d in group.dirs.values()):
                self._cgroup = group

    def clear_state(self):
        super().clear_state()
        self.walltime_end = None

    def get_args(self):
        args = list(super().get_args())
        if os.geteuid() == 0 and not self.run_as_user:
            # SimpleLocalProcessSpawner runs sessions as the hub's user; a hub started as
            # root (containers, CI) would otherwise see every server refuse to start.
            args.append("--ServerApp.allow_root=True")
        return args
