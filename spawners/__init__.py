"""Hub side of jupyter-aifab: ``PlacementSpawner`` (entry point ``aifab``).

    c.JupyterHub.spawner_class = "aifab"
    c.PlacementSpawner.profiles_file = "/etc/jupyterhub/profiles.yaml"

or, to have a mistake in the profiles stop the hub at start with the profile and field named:

    from aifab.spawners import use_placement_spawner
    use_placement_spawner(c, profiles_file="/etc/jupyterhub/profiles.yaml")
"""

from __future__ import annotations

from .options import OptionsError, Placement, options_from_form, validate_options
from .placement import PlacementSpawner
from .profiles import Profile, ProfileConfigError, load_profiles, load_profiles_file

__all__ = [
    "OptionsError", "Placement", "PlacementSpawner", "Profile", "ProfileConfigError",
    "load_profiles", "load_profiles_file", "options_from_form", "use_placement_spawner",
    "validate_options",
]


def use_placement_spawner(c, profiles: list | None = None, profiles_file: str = "") -> list:
    """Configure the hub (``c`` in jupyterhub_config.py) to use PlacementSpawner, checking the
    profiles now, so an admin's mistake stops the hub's start with the profile and field named.
    Returns the checked profiles."""
    raw = load_profiles_file(profiles_file) if profiles_file else profiles
    if raw is None:
        raise ProfileConfigError("use_placement_spawner: give profiles or profiles_file")
    checked = load_profiles(raw)
    c.JupyterHub.spawner_class = "aifab"
    c.PlacementSpawner.profiles = list(raw)
    c.PlacementSpawner.profiles_file = ""
    return checked
