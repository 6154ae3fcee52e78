"""``%dask``: a dask cluster for this session in one line (``aifab.cluster()`` and its widget).

    %dask workers=2 cores=4 memory=16GiB      # start one; it is also `cluster` in the notebook
    %dask                                       # show the session's cluster again
    %dask close                                 # close it: its worker jobs are cancelled
"""

from __future__ import annotations

import ast
import re
import shlex

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class

USAGE = "%dask [workers=N] [KEYWORD=VALUE ...] | %dask close"
_KEYWORD = re.compile(r"[a-z_][a-z0-9_]{0,63}")


def parse_dask(line: str) -> dict:
    """``key=value`` words -> keyword arguments; values are Python literals or plain text."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"{exc}\nusage: {USAGE}") from None
    kwargs = {}
    for word in words:
        key, sep, raw = word.partition("=")
        if not sep or not _KEYWORD.fullmatch(key):
            raise UsageError(f"{word!r} is not KEYWORD=VALUE\nusage: {USAGE}")
        try:
            kwargs[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            kwargs[key] = raw  # 16GiB, debug, 01:00:00
    return kwargs


@magics_class
class DaskMagics(Magics):
    @line_magic
    def dask(self, line: str):
        """%dask [workers=N] [KEYWORD=VALUE ...] | %dask close: the session's dask cluster."""
        ns = self.shell.user_ns
        current = ns.get("cluster")
        ours = current is not None and getattr(current, "_made_by_dask_magic", False)
        if line.strip() == "close":
            if not ours:
                raise UsageError("no cluster from %dask to close")
            current.close()
            return None
        kwargs = parse_dask(line)
        if ours and current.status.name == "running":
            if not kwargs:
                return current
            raise UsageError("a cluster from %dask is running (`cluster`): scale it with its "
                             "widget, or `%dask close` first to start another")
        import aifab
        from aifab.magics.dask_cluster import ClusterOptionError

        try:
            cluster = aifab.cluster(**kwargs)
        except ClusterOptionError as exc:
            raise UsageError(str(exc)) from None
        cluster._made_by_dask_magic = True
        ns["cluster"] = cluster
        return cluster
