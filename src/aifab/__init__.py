"""jupyter-aifab: notebook sessions for AI work on supercomputers.

The import namespace ``aifab`` holds four subpackages that live in the repository's
top-level folders (``aifab.spawners``, ``aifab.extension``, ``aifab.kernels``,
``aifab.magics``) and this small root package: the session contract shared by the hub
side and the session side. Importing it is cheap and has no side effects.
"""

from .session import Session, SessionContractError

__version__ = "0.1.0"

__all__ = ["Session", "SessionContractError", "__version__", "cluster", "data", "finetune",
           "serve"]


def __getattr__(name: str):
    # the notebook API, imported on first use so that `import aifab` stays cheap
    if name == "serve":
        from .serving import serve

        return serve
    if name == "finetune":
        from .finetuning import finetune

        return finetune
    if name == "cluster":
        from .dask_cluster import cluster

        return cluster
    if name == "data":
        import importlib

        return importlib.import_module(".data", __name__)
    raise AttributeError(f"module 'aifab' has no attribute {name!r}")
