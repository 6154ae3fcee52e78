"""batchspawner's settings that SlurmSessionSpawner does not use, and what to set instead.

SlurmSessionSpawner renders its own batch script from the profile and runs fixed argv
commands (sbatch/squeue/scancel through :mod:`aifab.slurm`), so batchspawner's templates,
``req_*`` values, command strings and state regexes would be silently ignored. An admin who
sets one meant something by it: :func:`refused_settings` finds them in the config and
:func:`check_config` refuses them, at hub start (``use_placement_spawner``) and at the
latest when the spawner is constructed.
"""

from __future__ import annotations

from collections.abc import Mapping

from batchspawner.batchspawner import BatchSpawnerBase, BatchSpawnerRegexStates, SlurmSpawner

# batchspawner settings that SlurmSessionSpawner does honour
HONOURED = frozenset({"start_timeout", "ip", "batchspawner_singleuser_cmd",
                      "startup_poll_interval"})

_SLURM_KEYS = ("the profile's `slurm:` keys (partition, account, qos, reservation, "
               "constraint, gres_type, prologue, exclusive)")
_COMMANDS = ("`SlurmSessionSpawner.submit_prefix` (an argv list run before sbatch/squeue/"
             "scancel, which are fixed)")
_STATES = "nothing: aifab reads squeue's `%T %r %B` itself"

INSTEAD = {
    "exec_prefix": _COMMANDS,
    "batch_submit_cmd": _COMMANDS,
    "batch_query_cmd": _COMMANDS,
    "batch_cancel_cmd": _COMMANDS,
    "batch_script": f"{_SLURM_KEYS}; the script is rendered from the profile and the "
                    "user's validated choices",
    "req_partition": "the profile's `slurm: {partition: ...}`",
    "req_queue": "the profile's `slurm: {partition: ...}`",
    "req_account": "the profile's `slurm: {account: ...}`",
    "req_qos": "the profile's `slurm: {qos: ...}`",
    "req_reservation": "the profile's `slurm: {reservation: ...}`",
    "req_options": _SLURM_KEYS,
    "req_prologue": "the profile's `slurm: {prologue: ...}`",
    "req_nprocs": "the profile's `choices: {cpus: {default, min, max}}`",
    "req_memory": "the profile's `choices: {memory_gb: {default, min, max}}`",
    "req_runtime": "the profile's `choices: {walltime: {default, max}}`",
    "req_ngpus": "the profile's `choices: {gpus: ...}` with `slurm: {gres_type: ...}`",
    "req_gres": "the profile's `choices: {gpus: ...}` with `slurm: {gres_type: ...}`",
    "req_epilogue": "nothing: the server is exec'd as the batch step (Slurm's signals reach "
                    "it); use the cluster's Slurm Epilog",
    "req_srun": "nothing: the server runs as the batch step itself, without srun",
    "req_host": "nothing: the Slurm client's configuration (SLURM_CONF in the hub's "
                "environment) picks the cluster",
    "req_cluster": "nothing: the Slurm client's configuration (SLURM_CONF in the hub's "
                   "environment) picks the cluster",
    "req_keepvars_extra": "`Spawner.env_keep` or `Spawner.environment`",
    "req_keepvars": "`Spawner.env_keep` or `Spawner.environment`",
    "req_username": "nothing: the job runs as the hub user's own Unix account",
    "req_homedir": "`SlurmSessionSpawner.job_output` (the job runs in the user's home)",
    "job_id": "nothing: this is the spawner's state, not a setting",
    "job_status": "nothing: this is the spawner's state, not a setting",
}


def ignored_settings() -> frozenset[str]:
    """Every setting of batchspawner's Slurm classes that SlurmSessionSpawner ignores."""
    names: set[str] = set()
    for cls in (BatchSpawnerBase, BatchSpawnerRegexStates, SlurmSpawner):
        names.update(cls.class_own_traits())
    return frozenset(names - HONOURED)


def instead(name: str) -> str:
    if name.startswith("state_"):
        return _STATES
    return INSTEAD.get(name, "nothing: SlurmSessionSpawner does not use it")


def refused_settings(config: Mapping, sections) -> list[tuple[str, str]]:
    """``(section, name)`` of each ignored batchspawner setting present in ``config`` (a
    traitlets Config) under one of ``sections`` (class names). Defaults are not settings."""
    ignored = ignored_settings()
    found = []
    for section in sections:
        # Config creates a section on attribute access; a membership test does not
        if section not in config:
            continue
        values = config[section]
        if not isinstance(values, Mapping):
            continue
        found += [(section, name) for name in sorted(values) if name in ignored]
    return found


class SlurmConfigError(ValueError):
    """A batchspawner setting that SlurmSessionSpawner would ignore is set."""


def check_config(config: Mapping, sections) -> None:
    """Raise SlurmConfigError naming each ignored setting and what to set instead."""
    found = refused_settings(config, sections)
    if found:
        raise SlurmConfigError("; ".join(
            f"c.{section}.{name} is set, but SlurmSessionSpawner does not use it: "
            f"{advice(name)}" for section, name in found))


def advice(name: str) -> str:
    """What to do about an ignored setting, as a sentence."""
    text = instead(name)
    if text.startswith("nothing: "):
        return f"remove it ({text.removeprefix('nothing: ')})"
    return f"use {text} instead"


def slurm_sections(cls) -> list[str]:
    """The config sections a spawner class reads (its own and its bases' class names)."""
    from traitlets.config import Configurable

    return [c.__name__ for c in cls.mro()
            if isinstance(c, type) and issubclass(c, Configurable)]
