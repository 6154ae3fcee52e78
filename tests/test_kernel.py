"""The "Python 3 (aifab)" kernel, started for real: the magics are loaded."""

from __future__ import annotations

import json

import pytest
from jupyter_client.manager import start_new_kernel


@pytest.fixture(scope="module")
def aifab_kernel():
    km, kc = start_new_kernel(kernel_name="aifab", startup_timeout=120)
    yield kc
    kc.stop_channels()
    km.shutdown_kernel(now=True)


def execute(kc, code: str) -> tuple[str, list[dict], str]:
    """Run code; return its stdout, the error replies (if any) and its stderr."""
    stdout, stderr, errors = [], [], []

    def collect(msg):
        if msg["msg_type"] == "stream":
            (stdout if msg["content"]["name"] == "stdout" else stderr).append(
                msg["content"]["text"])
        elif msg["msg_type"] == "error":
            errors.append(msg["content"])

    reply = kc.execute_interactive(code, timeout=120, output_hook=collect)
    if reply["content"]["status"] == "error":
        errors.append(reply["content"])
    return "".join(stdout), errors, "".join(stderr)


def test_magics_are_loaded_in_the_aifab_kernel(aifab_kernel):
    out, errors, _ = execute(aifab_kernel, "print('aifab.magics' in "
                                        "get_ipython().extension_manager.loaded)")
    assert not errors and out.strip() == "True"


def test_aifab_doctor_magic_reports_the_session(aifab_kernel):
    out, errors, _ = execute(aifab_kernel, "%aifab doctor --json")
    assert not errors
    names = [c["name"] for c in json.loads(out)]
    assert names[:3] == ["session", "slurm", "gpus"]


def test_a_wrong_magic_argument_is_a_usage_error(aifab_kernel):
    _, errors, stderr = execute(aifab_kernel, "%aifab frobnicate")
    # IPython shows a UsageError as a one-line message on stderr, not as a traceback
    assert errors and errors[0]["ename"] == "UsageError"
    assert "usage: %aifab doctor" in stderr
