"""The "Python 3 (aifab)" kernel spec: ipykernel with the aifab magics loaded.

``kernel_spec`` renders it (a pure function); ``install`` writes it where Jupyter looks,
through jupyter_client's own KernelSpecManager, exactly like ``ipykernel install`` does.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

KERNEL_NAME = "aifab"
DISPLAY_NAME = "Python 3 (aifab)"


def kernel_spec(python: str | None = None) -> dict:
    """The kernel.json content for the interpreter ``python`` (default: this one)."""
    return {
        "argv": [
            python or sys.executable,
            "-m",
            "ipykernel_launcher",
            "-f",
            "{connection_file}",
            # IPython's own way to load an extension at start-up (InteractiveShellApp)
            "--ext=aifab.magics",
        ],
        "display_name": DISPLAY_NAME,
        "language": "python",
        "metadata": {"debugger": True},
    }


def install(
    user: bool = False,
    sys_prefix: bool = False,
    prefix: str | None = None,
    python: str | None = None,
) -> str:
    """Install the kernel spec; returns the directory it was written to."""
    from jupyter_client.kernelspec import KernelSpecManager

    if sum(bool(x) for x in (user, sys_prefix, prefix)) > 1:
        raise ValueError("choose at most one of --user, --sys-prefix and --prefix")
    if sys_prefix:
        prefix = sys.prefix
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        with open(os.path.join(tmp, "kernel.json"), "w") as f:
            json.dump(kernel_spec(python), f, indent=2)
        return KernelSpecManager().install_kernel_spec(
            tmp, KERNEL_NAME, user=user, prefix=prefix, replace=True
        )
