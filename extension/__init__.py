"""Jupyter server extension ``aifab.extension``: the session's services.

Enabled automatically by ``etc/jupyter/jupyter_server_config.d/aifab.json`` (installed with
the package). Importing this package registers nothing; Jupyter loads ``AifabExtension``
when the server starts.
"""

from __future__ import annotations


def _jupyter_server_extension_points() -> list[dict]:
    from .app import AifabExtension

    return [{"module": "aifab.extension", "app": AifabExtension}]
