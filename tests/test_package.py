"""The installed package, tested from outside the checkout (DESIGN.md's traps of the
folder-to-namespace mapping)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CODE_FOLDERS = ("spawners", "extension", "kernels", "magics")
SUBPACKAGES = ("aifab", *(f"aifab.{f}" for f in CODE_FOLDERS))


def run_outside(code: str) -> str:
    """Run Python in a directory outside the checkout, so nothing local can shadow."""
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_every_subpackage_imports_from_the_installed_package():
    code = ("import json, importlib\n"
            f"mods = {list(SUBPACKAGES)!r}\n"
            "print(json.dumps({m: importlib.import_module(m).__file__ for m in mods}))")
    files = json.loads(run_outside(code))
    for mod, path in files.items():
        assert "site-packages" in path, f"{mod} imported from {path}, not the installed package"
        assert not Path(path).resolve().is_relative_to(REPO / "spawners"), path


@pytest.mark.parametrize("folder", CODE_FOLDERS)
def test_each_code_folder_is_a_package(folder):
    assert (REPO / folder / "__init__.py").is_file()


def test_no_module_imports_a_folder_by_its_bare_name():
    offenders = []
    for path in REPO.glob("**/*.py"):
        if ".venv" in path.parts or "demo-state" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names
                          if n.split(".")[0] in CODE_FOLDERS]
    assert offenders == []


def test_importing_aifab_is_cheap_and_has_no_side_effects():
    heavy = run_outside(
        "import sys, aifab, aifab.magics, aifab.extension, aifab.kernels\n"
        "print(sorted(m for m in ('torch', 'transformers', 'vllm', 'IPython.core.magic')"
        " if m in sys.modules))")
    assert heavy.strip() == "[]"


def test_spawner_entry_point_is_registered():
    (ep,) = [e for e in metadata.entry_points(group="jupyterhub.spawners") if e.name == "aifab"]
    from aifab.spawners import PlacementSpawner

    assert ep.load() is PlacementSpawner


def test_server_extension_is_enabled_by_the_shipped_config():
    out = subprocess.run([str(Path(sys.executable).parent / "jupyter"), "server", "extension",
                          "list"], cwd="/", capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    line = next((ln for ln in text.splitlines() if "aifab.extension" in ln and "enabled" in ln),
                None)
    assert line, text
    assert "aifab.extension  OK" in text.replace("\x1b[32m", "").replace("\x1b[0m", "")


def test_kernel_spec_is_installed_and_loads_the_magics():
    out = subprocess.run([str(Path(sys.executable).parent / "jupyter"), "kernelspec", "list",
                          "--json"], cwd="/", capture_output=True, text=True, timeout=60)
    specs = json.loads(out.stdout)["kernelspecs"]
    spec = specs["aifab"]["spec"]
    assert spec["display_name"] == "Python 3 (aifab)"
    assert os.path.samefile(spec["argv"][0], sys.executable)  # python or python3 of the venv
    assert "--ext=aifab.magics" in spec["argv"]


def test_kernels_install_into_a_prefix(tmp_path):
    out = subprocess.run([str(Path(sys.executable).parent / "aifab"), "kernels", "install",
                          "--prefix", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    spec = json.loads((tmp_path / "share/jupyter/kernels/aifab/kernel.json").read_text())
    assert spec["display_name"] == "Python 3 (aifab)"


def test_kernels_install_refuses_two_destinations():
    out = subprocess.run([str(Path(sys.executable).parent / "aifab"), "kernels", "install",
                          "--user", "--sys-prefix"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "not allowed with argument" in out.stderr


def test_venv_is_usable_by_an_unprivileged_user(test_user):
    """Slurm jobs run as the user: the interpreter and the package must be readable."""
    out = subprocess.run(["sudo", "-u", test_user.pw_name, sys.executable, "-c",
                          "import aifab.spawners, aifab.extension; print('ok')"],
                         cwd="/", capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr
