"""IPython extension ``aifab.magics``: ``%load_ext aifab.magics`` (the "Python 3 (aifab)"
kernel loads it for you).

Importing this package registers nothing; IPython calls ``load_ipython_extension``.
"""

from __future__ import annotations


def load_ipython_extension(ipython) -> None:
    from .allocating import AllocMagics
    from .dask_magic import DaskMagics
    from .finetune_magic import FineTuneMagics
    from .serve_magic import ServeMagics
    from .session_magics import SessionMagics

    ipython.register_magics(SessionMagics)
    ipython.register_magics(ServeMagics)
    ipython.register_magics(FineTuneMagics)
    ipython.register_magics(DaskMagics)
    ipython.register_magics(AllocMagics)


def unload_ipython_extension(ipython) -> None:  # IPython has no unregister; nothing to undo
    return None
