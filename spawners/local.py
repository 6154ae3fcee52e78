"""The ``local`` backend: the session runs as a process on the hub's machine.

This is the embedded default that makes ``make demo`` work on a laptop or a fresh VM: every
user's server runs as the hub's own OS user, in a per-user directory. It is for a demo, a
workshop VM or a single-user workstation; sites place sessions with the ``slurm`` or
``kubernetes`` backends (or configure ``PlacementSpawner.local_spawner_class`` to
JupyterHub's ``LocalProcessSpawner``, which runs each user as their own Unix account).
"""

from __future__ import annotations

import os
import sys

from jupyterhub.spawner import SimpleLocalProcessSpawner
from traitlets import default


class LocalSessionSpawner(SimpleLocalProcessSpawner):
    @default("cmd")
    def _cmd_default(self):
        # the single-user server of this very environment, not whatever PATH finds first,
        # through our launcher (it defers a slow import, see aifab/singleuser.py)
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

    def get_args(self):
        args = list(super().get_args())
        if os.geteuid() == 0:
            # SimpleLocalProcessSpawner runs sessions as the hub's user; a hub started as
            # root (containers, CI) would otherwise see every server refuse to start.
            args.append("--ServerApp.allow_root=True")
        return args
