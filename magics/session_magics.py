"""``%aifab``: the session at a glance from inside a notebook."""

from __future__ import annotations

import shlex

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class

USAGE = "%aifab doctor [--json]   -- what this session sees (placement, Slurm, GPUs, packages)"


@magics_class
class SessionMagics(Magics):
    @line_magic
    def aifab(self, line: str):
        """%aifab doctor [--json]: what this session sees."""
        words = shlex.split(line)
        if not words or words[0] != "doctor" or any(w != "--json" for w in words[1:]):
            raise UsageError(f"unknown arguments {line!r}; usage: {USAGE}")
        from aifab.magics.doctor import format_checks, run_checks, to_json

        checks = run_checks()
        print(to_json(checks) if "--json" in words else format_checks(checks))
        return None
