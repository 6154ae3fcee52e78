"""Every tutorial notebook in docs/notebooks runs top to bottom, as a class would run it: the
"Python 3 (aifab)" kernel, a real Jupyter server with the session services, the offline tiny
model, real training and a real vLLM on the CPU. Each notebook's wall time goes to
test-artifacts/tutorial-times.json."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.harness.jupyter import JupyterServer

REPO = Path(__file__).resolve().parent.parent
# a tutorial that needs a hub (its models gateway) runs in that hub's test module instead
IN_A_HUB = {"06-share-a-model.ipynb": "tests/test_models_gateway.py"}
NOTEBOOKS = sorted(p for p in (REPO / "docs" / "notebooks").glob("*.ipynb")
                   if p.name not in IN_A_HUB)
ARTIFACTS = REPO / "test-artifacts"

# what each notebook's outputs must show (beyond finishing without an error)
EXPECT = {
    "01-my-session.ipynb": ["[ok]   session", "backend:      local"],
    "02-data-prep.ipynb": ["3 bad records left out", "not valid JSON", "input_ids"],
    "03-finetune.ipynb": ["finished: loss"],
    "04-serve-and-chat.ipynb": ["answer: pong", '"content":"pong"'],
    "05-for-instructors.ipynb": ["workshop -> gh200 reservation course-2026",
                                 "HF_HUB_OFFLINE"],
}


def test_every_tutorial_is_checked():
    assert [p.name for p in NOTEBOOKS] == sorted(EXPECT)
    everything = sorted(p.name for p in (REPO / "docs" / "notebooks").glob("*.ipynb"))
    assert everything == sorted([*EXPECT, *IN_A_HUB])
    for name, module in IN_A_HUB.items():
        assert name in (REPO / module).read_text(), f"{module} does not run {name}"


@pytest.fixture(scope="module")
def session_server(tmp_path_factory):
    with JupyterServer(tmp_path_factory.mktemp("tutorials-server")) as server:
        yield server


def _text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            for value in out.get("data", {}).values():
                parts.append(value if isinstance(value, str) else json.dumps(value))
    return "\n".join(parts)


@pytest.mark.vllm
def test_tutorials_run_top_to_bottom(session_server, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("AIFAB_SERVER_URL", session_server.url)
    monkeypatch.setenv("AIFAB_SERVER_TOKEN", session_server.token)
    monkeypatch.setenv("AIFAB_TINY_MODEL", str(tiny_model))
    monkeypatch.setenv("AIFAB_BACKEND", "local")
    work = tmp_path / "class"
    work.mkdir()
    times: dict[str, float] = {}
    for path in NOTEBOOKS:  # in order, in one folder: 4 serves the adapter 3 trained
        shutil.copy(path, work / path.name)
        nb = nbformat.read(work / path.name, as_version=4)
        t0 = time.monotonic()
        try:
            NotebookClient(nb, kernel_name="aifab", timeout=900,
                           resources={"metadata": {"path": str(work)}}).execute()
        finally:
            (ARTIFACTS / "tutorials").mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, ARTIFACTS / "tutorials" / path.name)  # executed, to look at
        times[path.name] = round(time.monotonic() - t0, 1)
        text = _text(nb)
        for expected in EXPECT[path.name]:
            assert expected in text, f"{path.name}: {expected!r} not in its outputs:\n{text}"
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "tutorial-times.json").write_text(json.dumps(times, indent=1) + "\n")
    print("tutorial wall times (s):", times)
    # nothing the tutorials started outlives them needlessly: 4's server is the only service
    live = [s["name"] for s in session_server.get("aifab/api/services").json()
            if s["status"] in ("starting", "ready")]
    assert live == ["chat"]
