"""The baseline of benchmarks.finetune_cpu: a plain TRL SFTTrainer + PEFT LoRA script with the
settings %finetune uses, and nothing of aifab. Prints one JSON line with tokens/s measured as
the trainer measures it: input tokens seen over train() wall time."""

import argparse
import json

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

ap = argparse.ArgumentParser()
for flag in ("--model", "--data", "--output"):
    ap.add_argument(flag, required=True)
ap.add_argument("--max-steps", type=int, default=150)
ap.add_argument("--batch-size", type=int, default=8)
ap.add_argument("--seq-len", type=int, default=256)
ap.add_argument("--lr", type=float, default=1e-3)
args = ap.parse_args()

tok = AutoTokenizer.from_pretrained(args.model)
model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
trainer = SFTTrainer(
    model=model, processing_class=tok,
    train_dataset=load_dataset("json", data_files=args.data, split="train"),
    peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                           task_type="CAUSAL_LM"),
    args=SFTConfig(output_dir=args.output, max_steps=args.max_steps,
                   per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
                   max_length=args.seq_len, save_steps=50, save_total_limit=3, logging_steps=1,
                   report_to=[], seed=0, data_seed=0, use_cpu=True, dataloader_num_workers=0,
                   include_num_input_tokens_seen="non_padding", lr_scheduler_type="constant",
                   disable_tqdm=True))
result = trainer.train()
runtime = result.metrics["train_runtime"]
print(json.dumps({"train_tokens_per_second": trainer.state.num_input_tokens_seen / runtime,
                  "train_runtime": runtime}))
