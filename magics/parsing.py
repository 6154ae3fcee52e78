"""Argument parsing for the magics: a user's mistake is a UsageError (one line in the
notebook), never SystemExit or a traceback."""

from __future__ import annotations

import argparse

from IPython.core.error import UsageError


class MagicArgumentParser(argparse.ArgumentParser):
    def __init__(self, *args, usage_text: str, **kw):
        super().__init__(*args, add_help=False, **kw)
        self.usage_text = usage_text

    def error(self, message):
        raise UsageError(f"{message}\nusage: {self.usage_text}")
