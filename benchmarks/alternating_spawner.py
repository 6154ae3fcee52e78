"""Benchmark-only spawner class: one hub, two spawners. Users named ``base-*`` get plain
``batchspawner.SlurmSpawner`` (the baseline), everyone else ``PlacementSpawner``, so both are
measured through the same hub, proxy and Slurm."""

from __future__ import annotations

from batchspawner import SlurmSpawner
from jupyterhub.spawner import Spawner
from traitlets import Unicode

from aifab.spawners import PlacementSpawner


class BaselineSlurmSpawner(SlurmSpawner):
    # batchspawner resets ip to this default at every start; loopback keeps the benchmark's
    # servers off the network (it changes nothing else)
    ip = Unicode("127.0.0.1")


class AlternatingSpawner(Spawner):
    def __new__(cls, *args, **kwargs):
        user = kwargs["user"]
        klass = BaselineSlurmSpawner if user.name.startswith("base-") else PlacementSpawner
        return klass(*args, **kwargs)

    async def start(self):  # never called: __new__ returns another class's instance
        raise NotImplementedError

    async def stop(self, now=False):
        raise NotImplementedError

    async def poll(self):
        raise NotImplementedError
