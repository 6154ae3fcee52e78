"""The fine-tuning engine of %finetune: TRL's SFTTrainer (with PEFT for LoRA), run as its own
process — one per GPU under torchrun, or one on the CPU — never inside a kernel.

    python -m aifab.extension.trainer --model M --data D --output O [options]

It writes a metrics stream (``O/metrics.jsonl``: one JSON object per line) that the
notebook's widget follows, checkpoints every ``--save-steps`` and when told to stop (SIGTERM,
SIGUSR1 — what Slurm sends before the walltime — or when ``AIFAB_WALLTIME_END`` is near), and
on success leaves O as a LoRA adapter (or a full model) that vLLM serves as it is.

A checkpoint counts only once it carries ``aifab-complete``, written after the Trainer has
saved everything, so ``--resume`` never picks a half-written one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from aifab.extension.steps import pick_gpus
from aifab.session import ENV_WALLTIME_END

COMPLETE = "aifab-complete"
RUN_FILE = "aifab-run.json"
EXIT_INTERRUPTED = 75  # stopped early with a checkpoint: resume with --resume


def parse_args(argv=None) -> argparse.Namespace:
    from aifab.api import FineTuneOptions as d  # the one place defaults are set

    p = argparse.ArgumentParser(prog="aifab.extension.trainer")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--name", default="finetune")
    p.add_argument("--method", choices=("lora", "full"), default="lora")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--packing", action="store_true")
    p.add_argument("--lora-r", type=int, default=d.lora_r)
    p.add_argument("--lora-alpha", type=int, default=d.lora_alpha)
    p.add_argument("--save-steps", type=int, default=d.save_steps)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--walltime-margin", type=float, default=300.0,
                   help="checkpoint and stop this many seconds before AIFAB_WALLTIME_END")
    return p.parse_args(argv)


def latest_complete_checkpoint(ckpt_dir: Path) -> Path | None:
    done = [d for d in ckpt_dir.glob("checkpoint-*") if (d / COMPLETE).exists()]
    return max(done, key=lambda d: int(d.name.split("-")[1]), default=None)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pick_gpus(os.environ)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from aifab.extension.train_data import inspect_data, load_train_dataset

    out = Path(args.output)
    ckpt_dir = out / "checkpoints"
    rank = int(os.environ.get("RANK", "0"))
    # each rank says where it runs (the log of a run on several nodes shows every host)
    print(f"aifab trainer: rank {rank} of {os.environ.get('WORLD_SIZE', '1')} on "
          f"{socket.gethostname()}", flush=True)
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    stop_reason: list[str] = []
    stopped_by_us: list[int] = []  # the step at which our callback ended training
    if rank == 0:
        (out / RUN_FILE).unlink(missing_ok=True)  # "done" is only ever this run's

    def on_signal(signum, _frame):
        stop_reason.append(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGUSR1, on_signal)
    walltime_end = float(os.environ.get(ENV_WALLTIME_END) or 0) or None
    metrics_path = out / "metrics.jsonl"

    def emit(record: dict) -> None:
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"time": time.time(), **record}) + "\n")

    class Progress(TrainerCallback):
        """Metrics for the widget; checkpoint-and-stop when asked to."""

        def __init__(self):
            self.t_last, self.tokens_last = time.perf_counter(), 0

        def on_train_begin(self, targs, state, control, **kw):
            # after a resume the count starts where the checkpoint left it
            self.t_last, self.tokens_last = time.perf_counter(), int(
                state.num_input_tokens_seen or 0)

        def on_log(self, targs, state, control, logs=None, **kw):
            if "loss" not in (logs or {}):
                return
            now = time.perf_counter()
            tokens = int(state.num_input_tokens_seen or 0)
            rate = (tokens - self.tokens_last) / max(now - self.t_last, 1e-9)
            self.t_last, self.tokens_last = now, tokens
            emit({"event": "step", "step": state.global_step, "total": state.max_steps,
                  "epoch": round(state.epoch or 0, 3), "loss": logs["loss"],
                  "lr": logs.get("learning_rate"), "tokens": tokens,
                  "tokens_per_s": round(rate, 1), "gpu_mem_gb": gpu_memory()})

        def on_save(self, targs, state, control, **kw):
            d = ckpt_dir / f"checkpoint-{state.global_step}"
            _barrier()  # every rank's files (RNG states) are written before the marker
            if rank == 0 and d.is_dir():
                tmp = d / (COMPLETE + ".tmp")
                tmp.write_text(str(state.global_step))
                os.replace(tmp, d / COMPLETE)
                emit({"event": "checkpoint", "step": state.global_step, "path": str(d)})

        def on_step_end(self, targs, state, control, **kw):
            near_end = bool(walltime_end and time.time() > walltime_end - args.walltime_margin)
            # all ranks must agree on the step they stop at (the save is collective)
            if _any_rank(bool(stop_reason) or near_end) and state.global_step > 0 \
                    and state.global_step < state.max_steps:
                if not stop_reason:
                    stop_reason.append("walltime" if near_end else "signal on another rank")
                stopped_by_us.append(state.global_step)
                control.should_save = True
                control.should_training_stop = True

    def _any_rank(flag: bool) -> bool:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return flag
        t = torch.tensor([1 if flag else 0], device="cuda" if cuda else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _barrier() -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    def gpu_memory() -> list[float]:
        if not cuda:
            return []
        return [round(torch.cuda.max_memory_allocated(i) / 2**30, 2)
                for i in range(torch.cuda.device_count())]

    summary = inspect_data(args.data)
    dataset = load_train_dataset(summary)
    tok = AutoTokenizer.from_pretrained(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.bfloat16 if bf16 else torch.float32)
    peft_config = None
    if args.method == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    config = SFTConfig(
        output_dir=str(ckpt_dir), max_steps=args.max_steps, num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr,
        max_length=args.seq_len, packing=args.packing, save_steps=args.save_steps,
        save_total_limit=3, logging_steps=1, report_to=[], seed=args.seed, data_seed=args.seed,
        bf16=bf16, use_cpu=not cuda, dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding", lr_scheduler_type="constant",
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset,
                         processing_class=tok, peft_config=peft_config,
                         callbacks=[Progress()])
    resume = latest_complete_checkpoint(ckpt_dir) if args.resume else None
    emit({"event": "start", "name": args.name, "model": args.model, "data": summary.path,
          "records": summary.records, "method": args.method, "resume_from": str(resume or ""),
          "world_size": int(os.environ.get("WORLD_SIZE", "1")),
          "device": "cuda" if cuda else "cpu",
          # where it runs: the host, and the Slurm job and step (a run --on an allocation)
          "host": socket.gethostname(), "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
          "slurm_step_id": os.environ.get("SLURM_STEP_ID", ""),
          "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
          # what a --resume must keep equal (shapes, data order)
          "shape": {"model": args.model, "method": args.method, "lora_r": args.lora_r,
                    "lora_alpha": args.lora_alpha, "batch_size": args.batch_size,
                    "grad_accum": args.grad_accum, "seq_len": args.seq_len,
                    "packing": args.packing,
                    "world_size": int(os.environ.get("WORLD_SIZE", "1")),
                    # torchrun's number of agents: one per node
                    "nodes": int(os.environ.get("GROUP_WORLD_SIZE", "1"))}})
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    if stopped_by_us:  # (a signal after the last step changes nothing: the run is done)
        emit({"event": "interrupted", "reason": stop_reason[0],
              "step": trainer.state.global_step})
        # rank 0 has said so before any rank exits: a rank's exit ends the others' processes
        # (srun --kill-on-bad-exit on several nodes)
        _barrier()
        return EXIT_INTERRUPTED
    if rank == 0:
        trainer.save_model(str(out))  # the adapter (LoRA) or the model (full)
        tok.save_pretrained(str(out))
        (out / RUN_FILE).write_text(json.dumps({
            "name": args.name, "status": "done", "base_model": os.path.abspath(args.model)
            if os.path.isdir(args.model) else args.model, "method": args.method,
            "steps": trainer.state.global_step}, indent=2))
        emit({"event": "done", "step": trainer.state.global_step, "output": str(out),
              "train_runtime": result.metrics["train_runtime"],
              # the Trainer's own measure: tokens seen over train() wall time
              "train_tokens_per_second": trainer.state.num_input_tokens_seen
              / result.metrics["train_runtime"]})
        shutil.rmtree(out / "runs", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
