"""LoRA SFT throughput on a real GPU (an H100) through the %finetune engine.

    python -m benchmarks.finetune_gpu [--steps 30] [--seq-len 4096] [--gpus 1]

Builds a Llama-3-8B-shaped model with random weights (no download: 32 layers, hidden 4096,
GQA 32/8 heads, MLP 14336, vocabulary 128256; ~16 GB in bf16) and random-token training data,
then runs the same trainer %finetune runs (aifab.extension.trainer: TRL SFTTrainer + PEFT,
bf16, packing, one process per GPU) for a fixed number of steps.

Reports tokens/s per GPU and model FLOPs utilisation, MFU = 6 * N * tokens/s / peak, with N
the model's parameters and peak the H100's dense bf16 989 TFLOP/s (the convention NVIDIA's
NeMo figures use; LoRA skips the frozen weights' gradients, so 6N overstates the work done).
Anchor: NeMo's Llama3-8B LoRA on one H100, 12,473 tokens/s/GPU. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

PEAK_BF16 = 989e12  # H100 SXM, dense


def build_model(path: Path) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=8192, rope_theta=500000.0,
                      tie_word_embeddings=False, torch_dtype="bfloat16")
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path, safe_serialization=True)
    del model
    torch.cuda.empty_cache()
    from aifab.magics.tiny_model import build

    tok_dir = path.parent / "tok"
    build(tok_dir)  # a local tokenizer; the data below is plain text of its vocabulary
    for f in tok_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (path / f.name).write_bytes(f.read_bytes())
    return n


def text_data(path: Path, n: int = 4000) -> Path:
    rng = random.Random(0)
    words = [f"w{i}" for i in range(3000)]
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(3000))}) + "\n")
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--gpus", type=int, default=1)
    args = ap.parse_args()
    try:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device")
    except Exception as exc:
        print(json.dumps({"bench": "finetune_gpu", "skipped": f"no GPU here ({exc})"}))
        return 0
    work = Path(tempfile.mkdtemp(prefix="aifab-ft-gpu-"))
    n_params = build_model(work / "llama3-8b-shaped")
    data = text_data(work / "text.jsonl")
    trainer = ["-m", "aifab.extension.trainer", "--model", str(work / "llama3-8b-shaped"),
               "--data", str(data), "--output", str(work / "out"), "--max-steps",
               str(args.steps), "--seq-len", str(args.seq_len), "--packing", "--batch-size",
               str(args.batch_size), "--save-steps", str(10 * args.steps), "--lora-r", "16",
               "--lora-alpha", "32"]
    argv = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
             f"--nproc-per-node={args.gpus}", *trainer] if args.gpus > 1
            else [sys.executable, *trainer])
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(args.gpus)))}
    r = subprocess.run(argv, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        return 1
    events = [json.loads(line) for line in (work / "out" / "metrics.jsonl").open()]
    steps = [e for e in events if e.get("event") == "step"]
    steady = steps[len(steps) // 3:]  # leave out the warm-up steps
    tps = (steady[-1]["tokens"] - steady[0]["tokens"]) / (steady[-1]["time"] - steady[0]["time"])
    per_gpu = tps / args.gpus
    print(json.dumps({
        "bench": "finetune_gpu", "gpu": torch.cuda.get_device_name(0), "gpus": args.gpus,
        "params": n_params, "seq_len": args.seq_len, "steps": args.steps,
        "tokens_per_s_per_gpu": round(per_gpu), "mfu_6n": round(6 * n_params * per_gpu /
                                                                PEAK_BF16, 3),
        "nemo_anchor_tokens_per_s_per_gpu": 12473,
        "ratio_to_anchor": round(per_gpu / 12473, 3),
        "gpu_mem_gb": steps[-1].get("gpu_mem_gb")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
