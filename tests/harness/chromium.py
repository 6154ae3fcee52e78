"""Debian's chromium, driven headless by Playwright (which downloads no browser)."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"


@contextlib.contextmanager
def launch(shots: Path):
    """A headless chromium, with ``shots`` made empty for the test's screenshots."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium "
                    "(scripts/install-system-deps.sh --browser)")
    from playwright.sync_api import sync_playwright

    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield browser
        finally:
            browser.close()
