"""The configuration reference (docs/config-reference.md), generated from the traitlets help of
aifab's configurable classes, so that it cannot drift from the code.

    aifab config-reference > docs/config-reference.md
"""

from __future__ import annotations

import inspect

from traitlets import Type, Undefined

HEADER = """# Configuration reference

Generated from the code by `aifab config-reference` (a test checks that this file is current).
Hub settings go in `jupyterhub_config.py` (`c.PlacementSpawner.profiles_file = ...`); the
session's server extension is configured in `jupyter_server_config.py` or on the command line
(`--AifabExtension.stop_grace=30`). Profiles themselves (YAML or `PlacementSpawner.profiles`)
are described in docs/admin-guide.md.
"""


def _classes():
    from aifab.extension.app import AifabExtension
    from aifab.spawners.local import LocalSessionSpawner
    from aifab.spawners.placement import PlacementSpawner
    from aifab.spawners.slurm import SlurmSessionSpawner

    return [
        (PlacementSpawner, "JupyterHub: the spawner users see (`c.JupyterHub.spawner_class = "
                           "'aifab'`)."),
        (SlurmSessionSpawner, "JupyterHub: the Slurm backend, a batchspawner `SlurmSpawner` "
                              "that renders its script from the profile. Of batchspawner's "
                              "own options only `start_timeout`, `ip`, "
                              "`batchspawner_singleuser_cmd` and `startup_poll_interval` "
                              "apply; setting any other (`req_*`, `batch_script`, "
                              "`exec_prefix`, `batch_*_cmd`, `state_*_re`) stops the hub "
                              "with the profile key or option to use instead "
                              "(docs/admin-guide.md)."),
        (LocalSessionSpawner, "JupyterHub: the local backend (JupyterHub's "
                              "`SimpleLocalProcessSpawner` options apply too)."),
        (AifabExtension, "Jupyter server: the session's services."),
    ]


def _default(trait) -> str:
    if isinstance(trait, Type):
        value = trait.default_value
        return value if isinstance(value, str) else f"{value.__module__}.{value.__qualname__}"
    value = trait.default_value
    if value is Undefined or value is None:
        return "(computed)" if value is Undefined else "None"
    return repr(value)


def render() -> str:
    out = [HEADER]
    for cls, where in _classes():
        out.append(f"\n## `{cls.__name__}`\n\n{where}\n")
        own = {name: t for name, t in cls.class_own_traits(config=True).items()}
        if not own:
            out.append("\n(no options of its own)\n")
        for name in sorted(own):
            trait = own[name]
            helptext = inspect.cleandoc(trait.help or "").replace("\n", " ")
            out.append(f"\n### `{cls.__name__}.{name}`\n\n{type(trait).__name__}, default "
                       f"`{_default(trait)}`\n\n{helptext}\n")
    return "".join(out)


def main() -> int:
    print(render(), end="")
    return 0
