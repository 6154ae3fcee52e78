"""Jupyter server extension ``aifab.extension``: the session's services.

Enabled automatically by ``etc/jupyter/jupyter_server_config.d/aifab.json`` (installed with
the package). Importing this package registers nothing; Jupyter calls
``_load_jupyter_server_extension`` when the server starts.
"""

from __future__ import annotations


def _jupyter_server_extension_points() -> list[dict]:
    return [{"module": "aifab.extension"}]


def _load_jupyter_server_extension(serverapp) -> None:
    from .handlers import setup_handlers

    setup_handlers(serverapp.web_app)
    serverapp.log.info("aifab: session services loaded at %saifab/api/",
                       serverapp.web_app.settings.get("base_url", "/"))
