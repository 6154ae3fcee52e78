"""The hub's Slurm load in its own Prometheus metrics (``/hub/metrics``, scope read:metrics).

``aifab_slurm_commands_total{command="squeue"}`` counts the Slurm commands the hub ran,
through the one choke point (:data:`aifab.slurm.calls`); ``aifab_slurm_poll_rounds_total``
the shared poller's rounds. What an admin watches in a class, and what ``aifab loadtest``
reports. A collector reads the counts when scraped: the choke point stays free of
prometheus_client.
"""

from __future__ import annotations

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily

from aifab import slurm

from . import slurm_poller


class SlurmCommandsCollector:
    def collect(self):
        commands = CounterMetricFamily("aifab_slurm_commands",
                                       "Slurm commands this hub ran, per command",
                                       labels=["command"])
        for command in slurm.COMMANDS:
            commands.add_metric([command], slurm.calls[command])
        yield commands
        rounds = CounterMetricFamily("aifab_slurm_poll_rounds",
                                     "Rounds of the shared squeue for all of this hub's sessions")
        rounds.add_metric([], sum(p.rounds for loop in list(slurm_poller._pollers.values())
                                  for p in loop.values()))
        yield rounds


_registered = False


def register() -> None:
    """Once per process (the hub's), at the Slurm spawner's import."""
    global _registered
    if not _registered:
        REGISTRY.register(SlurmCommandsCollector())
        _registered = True
