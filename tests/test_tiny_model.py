"""The offline tiny model: built locally, loadable by transformers, cached by content."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from aifab.magics.tiny_model import COMPLETE_MARKER, TinyModelSpec, build_cached, content_hash


def test_tiny_model_loads_and_chats(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    text = tok.apply_chat_template([{"role": "user", "content": "ping 3"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nping 3<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[:2] == ids.shape
    assert model.config.hidden_size // model.config.num_attention_heads >= 32
    assert tok.eos_token == "<|im_end|>"
    summary = json.loads((Path(tiny_model) / COMPLETE_MARKER).read_text())
    assert summary["params"] < 3_000_000


def test_cache_is_reused_and_keyed_by_content(tiny_model):
    assert build_cached(Path(tiny_model).parent) == tiny_model
    assert tiny_model.name == content_hash(TinyModelSpec())
    other = dataclasses.replace(TinyModelSpec(), seed=1)
    assert content_hash(other) != content_hash(TinyModelSpec())


def test_spec_refuses_a_head_size_vllm_cannot_serve():
    with pytest.raises(ValueError, match="head size"):
        TinyModelSpec(hidden=64, heads=4)


def test_cli_builds_a_model_and_refuses_a_used_directory(tmp_path):
    aifab = str(Path(sys.executable).parent / "aifab")
    out = subprocess.run([aifab, "tiny-model", str(tmp_path / "m")], capture_output=True,
                         text=True, timeout=300, cwd="/")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert "Built a tiny random Llama" in out.stdout
    again = subprocess.run([aifab, "tiny-model", str(tmp_path / "m")], capture_output=True,
                           text=True, timeout=60, cwd="/")
    assert again.returncode == 1
    assert "is not empty" in again.stderr
