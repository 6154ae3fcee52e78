"""jupyter-aifab: notebook sessions for AI work on supercomputers.

The import namespace ``aifab`` holds four rooms that live in the repository's top-level
folders — ``aifab.spawners`` (the hub), ``aifab.extension`` (the session's server),
``aifab.magics`` (the notebook: magics, widgets and the kernel-side API) and
``aifab.kernels`` (kernel specs) — and this small root package: the session contract and the
value types and parsers both sides share. The root imports no room; this file is the one
front door that re-exports the notebook API for users, on first use, so that
``import aifab`` stays cheap and has no side effects.
"""

from __future__ import annotations

import importlib

from .session import Session, SessionContractError

__version__ = "0.1.0"

# name users reach as aifab.NAME -> (module in the notebook room, attribute or None for the
# module itself)
_NOTEBOOK_API = {
    "serve": ("aifab.magics.serving", "serve"),
    "finetune": ("aifab.magics.finetuning", "finetune"),
    "cluster": ("aifab.magics.dask_cluster", "cluster"),
    "allocate": ("aifab.magics.allocating", "allocate"),
    "allocations": ("aifab.magics.allocating", "allocations"),
    "client": ("aifab.published", "client"),
    "data": ("aifab.magics.data", None),
    "examples": ("aifab.magics.examples", None),
}

__all__ = ["Session", "SessionContractError", "__version__", "models", *_NOTEBOOK_API]


def __dir__():
    return sorted(set(globals()) | set(__all__))


def __getattr__(name: str):
    if name == "models":  # the model cache; called, the published models (aifab.models)
        return importlib.import_module("aifab.models")
    if name not in _NOTEBOOK_API:
        raise AttributeError(f"module 'aifab' has no attribute {name!r}")
    module, attr = _NOTEBOOK_API[name]
    mod = importlib.import_module(module)
    return mod if attr is None else getattr(mod, attr)
