"""The docs keep in step with the code: the configuration reference is generated from the
traitlets help, every doc the README links exists, and binder/ has what a builder runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_config_reference_is_current():
    from aifab.config_reference import render

    committed = (REPO / "docs" / "config-reference.md").read_text()
    assert render() == committed, (
        "docs/config-reference.md is stale: run `aifab config-reference > "
        "docs/config-reference.md`")
    for option in ("PlacementSpawner.profiles_file", "SlurmSessionSpawner.submit_prefix",
                   "AifabExtension.stop_grace"):
        assert f"### `{option}`" in committed


def test_cli_prints_the_reference():
    out = subprocess.run([str(Path(sys.executable).parent / "aifab"), "config-reference"],
                         capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout == (REPO / "docs" / "config-reference.md").read_text()


def test_readme_and_docs_links_resolve():
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"


def test_binder_has_what_a_builder_runs(tmp_path):
    import os

    import tomllib
    import yaml

    binder = REPO / "binder"
    env = yaml.safe_load((binder / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    post = binder / "postBuild"
    assert os.access(post, os.X_OK) and os.access(binder / "start", os.X_OK)
    assert subprocess.run(["bash", "-n", str(post)]).returncode == 0
    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())
                 ["project"]["optional-dependencies"])
    text = post.read_text()
    wanted = set(re.search(r'"\.\[([a-z,-]+)\]"', text).group(1).split(","))
    assert wanted <= extras and "serve-cpu" in wanted  # CPU-only serving
    assert "aifab kernels install --sys-prefix" in text
    assert 'aifab tiny-model "${HOME}/models/tiny-llama"' in text

    # start: the session contract and the model folder the tutorials use, then the command
    out = subprocess.run([str(binder / "start"), sys.executable, "-c",
                          "import aifab, aifab.models as m; s = aifab.Session.from_env();"
                          "print(s.backend, s.profile, m.cache_dir())"],
                         env={"HOME": str(tmp_path), "PATH": os.environ["PATH"]},
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["local", "binder", str(tmp_path / "models")], out.stderr
