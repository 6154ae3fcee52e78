"""Hub side of jupyter-aifab: ``PlacementSpawner`` (entry point ``aifab``).

    c.JupyterHub.spawner_class = "aifab"
    c.PlacementSpawner.profiles_file = "/etc/jupyterhub/profiles.yaml"

or, to have a mistake in the profiles stop the hub at start with the profile and field named:

    from aifab.spawners import use_placement_spawner
    use_placement_spawner(c, profiles_file="/etc/jupyterhub/profiles.yaml")

The names below are imported on first use: the job side of the port protocol
(``aifab.spawners.singleuser``, run on the compute node) must start without importing
JupyterHub, batchspawner and kubespawner.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "OptionsError": "options", "Placement": "options", "options_from_form": "options",
    "validate_options": "options", "PlacementSpawner": "placement", "Profile": "profiles",
    "ProfileConfigError": "profiles", "load_profiles": "profiles",
    "load_profiles_file": "profiles",
}

__all__ = [*_EXPORTS, "use_placement_spawner"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'aifab.spawners' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def use_placement_spawner(c, profiles: list | None = None, profiles_file: str = "") -> list:
    """Configure the hub (``c`` in jupyterhub_config.py) to use PlacementSpawner, checking the
    profiles now, so an admin's mistake stops the hub's start with the profile and field named.
    Returns the checked profiles."""
    from .profiles import ProfileConfigError, load_profiles, load_profiles_file

    raw = load_profiles_file(profiles_file) if profiles_file else profiles
    if raw is None:
        raise ProfileConfigError("use_placement_spawner: give profiles or profiles_file")
    checked = load_profiles(raw)
    # batchspawner settings the Slurm backend would ignore stop the hub's start too
    from .batchspawner_settings import check_config, slurm_sections
    from .slurm import SlurmSessionSpawner

    check_config(c, slurm_sections(SlurmSessionSpawner))
    c.JupyterHub.spawner_class = "aifab"
    c.PlacementSpawner.profiles = list(raw)
    c.PlacementSpawner.profiles_file = ""
    return checked
