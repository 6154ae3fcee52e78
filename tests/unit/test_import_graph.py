"""The house's walls: which room may import which, read from the installed package's source
(every import, at module level or inside a function).

Rooms: hub (aifab.spawners), session (aifab.extension), notebook (aifab.magics), kernels
(aifab.kernels), the models gateway (aifab.gateway, a hub service of its own) and the root
(aifab.*: the contract and the shared small types). Forbidden: hub ↛ notebook, hub ↛ session,
session ↛ notebook, notebook ↛ hub, session ↛ hub, the gateway ↛ any other room and no room
↛ the gateway (they talk over HTTP only), root ↛ any room. The front doors —
``aifab/__init__.py`` (re-exports the notebook API for users) and the command line
(``aifab.cli``, ``aifab.config_reference``) — may reach every room; that is their job.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import aifab

ROOMS = {"spawners": "hub", "extension": "session", "magics": "notebook", "kernels": "kernels",
         "gateway": "gateway"}
FORBIDDEN = {("hub", "notebook"), ("hub", "session"), ("session", "notebook"),
             ("notebook", "hub"), ("session", "hub")} | {
    pair for room in ("hub", "session", "notebook", "kernels")
    for pair in (("gateway", room), (room, "gateway"))}
FRONT_DOORS = {"aifab", "aifab.cli", "aifab.config_reference"}


def room_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "aifab":
        return None  # not ours
    if len(parts) > 1 and parts[1] in ROOMS:
        return ROOMS[parts[1]]
    return "root"


def module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, module: str) -> set[str]:
    """Every module ``path`` imports, relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # `from aifab import slurm` imports the module aifab.slurm
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" \
                and node.args and isinstance(node.args[0], ast.Constant):
            found.add(str(node.args[0].value))
    return found


def forbidden_arrows(package_root: Path) -> list[str]:
    known = {module_name(package_root, p) for p in package_root.rglob("*.py")}
    arrows = []
    for path in sorted(package_root.rglob("*.py")):
        module = module_name(package_root, path)
        if module in FRONT_DOORS:
            continue
        src = room_of(module)
        for target in sorted(imports_of(path, module)):
            if target not in known:
                continue  # a name imported from a module, or not ours
            dst = room_of(target)
            if dst is None or dst == src:
                continue
            if (src, dst) in FORBIDDEN or (src == "root" and dst != "root"):
                arrows.append(f"{module} ({src}) -> {target} ({dst})")
    return arrows


def installed_package() -> Path:
    return Path(aifab.__file__).parent


def test_the_installed_package_has_no_forbidden_arrow():
    root = installed_package()
    assert {p.name for p in root.iterdir() if p.is_dir()} >= set(ROOMS)
    assert forbidden_arrows(root) == []


def test_a_planted_import_is_caught_for_each_forbidden_arrow(tmp_path):
    copy = tmp_path / "aifab"
    shutil.copytree(installed_package(), copy,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "templates"))
    plants = {  # a file in the source room -> a module of the target room
        "spawners/options.py": "aifab.magics.client",          # hub -> notebook
        "spawners/form.py": "aifab.extension.ledger",          # hub -> session
        "extension/ledger.py": "aifab.magics.serving",         # session -> notebook
        "magics/parsing.py": "aifab.spawners.profiles",        # notebook -> hub
        "extension/records.py": "aifab.spawners.options",      # session -> hub
        "session.py": "aifab.extension.services",              # root -> a room
        "gateway/limits.py": "aifab.extension.services",       # gateway -> session
        "extension/publishing.py": "aifab.gateway.registry",   # session -> gateway
    }
    for file, target in plants.items():
        planted = copy / file
        original = planted.read_text()
        # inside a function, where a lazy import hides
        planted.write_text(original + f"\n\ndef _planted():\n    import {target}  # noqa\n")
        arrows = forbidden_arrows(copy)
        planted.write_text(original)
        assert len(arrows) == 1 and arrows[0].endswith(f"-> {target} ({room_of(target)})"), \
            (file, arrows)
    assert forbidden_arrows(copy) == []
