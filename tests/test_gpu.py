"""What only a GPU machine can show (marker ``gpu``; skipped with its reason elsewhere)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu


def test_pinning_on_real_gpus():
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu_pinning"], capture_output=True,
                         text=True, timeout=600)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "skipped" not in result, result
    assert result["all_pinned_correctly"], result
    assert "requested but 0 free" in result["over_request_refused"]


def test_lora_finetune_on_a_gpu(tiny_model, tmp_path):
    from aifab.magics.examples import write_ping_pong

    data = write_ping_pong(tmp_path / "ping.jsonl")
    r = subprocess.run([sys.executable, "-m", "aifab.extension.trainer", "--model",
                        str(tiny_model), "--data", str(data), "--output", str(tmp_path / "o"),
                        "--max-steps", "30", "--seq-len", "64"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    events = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").open()]
    assert next(e for e in events if e.get("event") == "start")["device"] == "cuda"
    assert [e for e in events if e.get("event") == "step"][-1]["gpu_mem_gb"]
