"""The JupyterLab extension as users get it: the wheel carries the prebuilt assets, and a
fresh venv that installed only the wheel lists the extension enabled and OK; and the assets
committed in labextension/prebuilt are what the TypeScript source builds to (npm, the
registry and the locked packages: what CI machines have)."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "labextension"
PREBUILT = SOURCE / "prebuilt"
DATA = "share/jupyter/labextensions/jupyter-aifab"
# what the build reads: everything else in labextension/ is output or node_modules
BUILD_INPUTS = ("package.json", "package-lock.json", "tsconfig.json", "rspack.config.js", "src",
                "style")


def _files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # no build isolation: the venv's setuptools, so the test needs no index
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(out), str(REPO)], check=True,
                   timeout=300, cwd=out)
    (whl,) = out.glob("jupyter_aifab-*.whl")
    return whl


def test_the_wheel_carries_the_prebuilt_assets(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = {n.split(".data/data/", 1)[1]: n for n in z.namelist() if ".data/data/" in n}
        committed = _files(PREBUILT)
        for rel, path in committed.items():
            assert f"{DATA}/{rel}" in names, f"{rel} is not in the wheel"
            assert z.read(names[f"{DATA}/{rel}"]) == path.read_bytes(), rel
        assert f"{DATA}/install.json" in names
        shipped = {n for n in names if n.startswith(DATA + "/")}
        # no stale chunk of an earlier build rides along
        assert shipped == {f"{DATA}/{r}" for r in committed} | {f"{DATA}/install.json"}
        load = json.loads(z.read(names[f"{DATA}/package.json"]))["jupyterlab"]["_build"]["load"]
        assert f"{DATA}/{load}" in names
    added = sum(p.stat().st_size for p in committed.values())
    print(f"prebuilt assets: {len(committed)} files, {added / 1024:.1f} KiB uncompressed")


def test_a_venv_with_only_the_wheel_lists_the_extension_enabled_and_ok(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path("
                                "'purelib'))"], capture_output=True, text=True,
                               check=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
                    "--no-deps", str(wheel)], check=True, timeout=300)
    assert (venv / DATA / "package.json").is_file()
    # Then JupyterLab itself from the test venv (installing it afresh takes minutes), after
    # the new venv's own site-packages: the wheel's files win. Added after the install, or
    # pip would find jupyter-aifab installed already. Only the new venv's prefix is a
    # Jupyter data dir here, so the extension listed is the wheel's.
    (site / "aifab-test-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER")}
    env["HOME"] = str(tmp_path)  # no user-level extensions of whoever runs the suite
    out = subprocess.run([str(py), "-m", "jupyterlab.labextensions", "list"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, env=env)
    listing = out.stdout + out.stderr
    line = next((ln for ln in listing.splitlines() if "jupyter-aifab" in ln), "")
    assert str(venv) in listing, listing
    assert "enabled" in line and "OK" in line, listing


@pytest.mark.npm
def test_the_committed_assets_are_what_the_source_builds_to(tmp_path):
    """Rebuild from the source alone (npm ci from the lock file) into a temp copy and compare
    every file byte for byte. The build is deterministic: content-hashed chunk names, no
    absolute paths, no timestamps (rspack's production output), so any difference means the
    committed assets are stale: run `make labextension`."""
    for tool in ("node", "npm"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is missing: `make test` needs node and npm (Debian: nodejs, "
                        "npm) to check labextension/prebuilt against its source")
    work = tmp_path / "labextension"
    work.mkdir()
    for name in BUILD_INPUTS:
        src = SOURCE / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for argv in (["npm", "ci", "--no-audit", "--no-fund"], ["npm", "run", "build"]):
        run = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, f"{argv}: {run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    built, committed = _files(work / "prebuilt"), _files(PREBUILT)
    assert sorted(built) == sorted(committed), "run `make labextension` and commit the result"
    differ = [rel for rel in built if not filecmp.cmp(built[rel], committed[rel], shallow=False)]
    assert differ == [], f"{differ} differ from the source's build: run `make labextension`"
