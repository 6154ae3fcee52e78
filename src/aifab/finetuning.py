"""``aifab.finetune(...)``: LoRA or full fine-tuning on the session's GPUs, as a run owned by
the session services (it outlives the kernel; any notebook can attach to it by name)."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .client import ServiceHandle, ServiceRequestError, SessionClient

RUN_FILE = "aifab-run.json"


class FineTuneError(ValueError):
    """A fine-tune request refused before any process starts."""


@dataclass
class FineTuneOptions:
    model: str
    data: str
    name: str = ""
    method: str = "lora"
    epochs: float | None = None
    max_steps: int | None = None
    lr: float = 2e-4
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 512
    packing: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    gpus: int | str | None = None
    output: str = ""
    resume: bool = False
    serve: bool = False
    save_steps: int = 50
    seed: int = 0


def check_options(o: FineTuneOptions) -> FineTuneOptions:
    """Everything that can be checked before a process starts. Raises FineTuneError."""
    from aifab.extension.train_data import DataError, inspect_data

    from .models import cached_models, resolve

    model = resolve(o.model)  # a name in the site's shared model cache, if there is one
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise FineTuneError(f"model {o.model!r}: the directory has no config.json")
        o.model = os.path.abspath(model)
    elif model.startswith(("/", ".", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        cached = ", ".join(cached_models())
        raise FineTuneError(f"model {o.model!r}: no such model directory (and not a Hugging "
                            "Face id like org/name)"
                            + (f"; the shared model cache has: {cached}" if cached else ""))
    try:
        inspect_data(o.data)
    except DataError as exc:
        raise FineTuneError(str(exc)) from None
    o.data = os.path.abspath(os.path.expanduser(o.data))
    if o.method not in ("lora", "full"):
        raise FineTuneError(f"method {o.method!r}: lora or full")
    # YAML reads 2e-4 as a string; every number is checked (and converted) here
    for fname, kind in (("lr", float), ("epochs", float), ("max_steps", int),
                        ("batch_size", int), ("grad_accum", int), ("seq_len", int),
                        ("lora_r", int), ("lora_alpha", int), ("save_steps", int),
                        ("seed", int)):
        value = getattr(o, fname)
        if value is None or (isinstance(value, kind) and not isinstance(value, bool)):
            continue
        try:
            converted = kind(value)
            if kind is int and str(value).strip() != str(converted):
                raise ValueError
        except (TypeError, ValueError):
            what = "an integer" if kind is int else "a number"
            raise FineTuneError(f"{fname}={value!r}: expected {what}") from None
        setattr(o, fname, converted)
    if o.epochs is not None and not o.epochs > 0:
        raise FineTuneError(f"epochs={o.epochs!r}: more than 0")
    o.name = o.name or default_run_name(o.model)
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,38}[a-z0-9]|[a-z0-9]", o.name):
        raise FineTuneError(f"name {o.name!r}: lowercase letters, digits and '-', at most 40")
    for fname, value, lo in (("batch_size", o.batch_size, 1), ("grad_accum", o.grad_accum, 1),
                             ("seq_len", o.seq_len, 16), ("lora_r", o.lora_r, 1),
                             ("lora_alpha", o.lora_alpha, 1), ("save_steps", o.save_steps, 1)):
        if not isinstance(value, int) or value < lo:
            raise FineTuneError(f"{fname}={value!r}: an integer >= {lo}")
    if o.max_steps is not None and (not isinstance(o.max_steps, int) or o.max_steps < 1):
        raise FineTuneError(f"max_steps={o.max_steps!r}: an integer >= 1")
    if not 0 < o.lr < 1:
        raise FineTuneError(f"lr={o.lr!r}: a learning rate between 0 and 1")
    out = Path(os.path.expanduser(o.output or f"~/aifab-runs/{o.name}")).absolute()
    if out.exists() and any(out.iterdir()):
        owner = _run_name(out)
        if not o.resume or owner not in (o.name, None):
            what = f"run {owner!r}" if owner else "other files"
            raise FineTuneError(
                f"output {str(out)!r} holds {what}; choose another --output"
                + (", or --resume to continue it" if owner == o.name else ""))
    o.output = str(out)
    if o.resume:
        _check_resume_shape(o, out)
    return o


def _check_resume_shape(o: FineTuneOptions, out: Path) -> None:
    """A resume must keep what the checkpoint's shapes and data order depend on."""
    starts = [json.loads(line) for line in _lines(out / "metrics.jsonl")
              if '"event": "start"' in line]
    if not starts or "shape" not in starts[-1]:
        return
    was = starts[-1]["shape"]
    now = {"model": o.model, "method": o.method, "lora_r": o.lora_r,
           "lora_alpha": o.lora_alpha, "batch_size": o.batch_size, "grad_accum": o.grad_accum,
           "seq_len": o.seq_len, "packing": o.packing}
    changed = [f"{k} {was[k]!r} -> {v!r}" for k, v in now.items() if k in was and was[k] != v]
    if changed:
        raise FineTuneError("--resume must keep the run's settings; changed: "
                            + ", ".join(changed))


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError:
        return []


def _run_name(out: Path) -> str | None:
    for f in (out / RUN_FILE, out / "metrics.jsonl"):
        try:
            first = json.loads(f.read_text().splitlines()[0] if f.suffix == ".jsonl"
                               else f.read_text())
            return first.get("name")
        except (OSError, ValueError, IndexError):
            continue
    return None


def default_run_name(model: str) -> str:
    base = re.sub(r"[^a-z0-9-]+", "-", model.rstrip("/").rsplit("/", 1)[-1].lower()).strip("-")
    return (f"ft-{base}"[:33] + time.strftime("-%H%M%S")).strip("-")


def trainer_argv(o: FineTuneOptions, ngpus: int) -> list[str]:
    args = ["-m", "aifab.extension.trainer", "--model", o.model, "--data", o.data,
            "--output", o.output, "--name", o.name, "--method", o.method, "--lr", str(o.lr),
            "--batch-size", str(o.batch_size), "--grad-accum", str(o.grad_accum),
            "--seq-len", str(o.seq_len), "--lora-r", str(o.lora_r),
            "--lora-alpha", str(o.lora_alpha), "--save-steps", str(o.save_steps),
            "--seed", str(o.seed)]
    if o.max_steps:
        args += ["--max-steps", str(o.max_steps)]
    if o.epochs:
        args += ["--epochs", str(o.epochs)]
    if o.packing:
        args.append("--packing")
    if o.resume:
        args.append("--resume")
    if ngpus > 1:  # one process per GPU; torchrun passes Slurm's SIGUSR1 on to them
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={ngpus}",
                "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
                "--shutdown-timeout=50", *args]
    return [sys.executable, *args]


class FineTuneRun(ServiceHandle):
    """A handle on a run: its status and metrics, whichever kernel started it."""

    @property
    def output(self) -> str:
        return self.info["output"]

    def metrics(self, since_last_start: bool = False) -> list[dict]:
        lines = _lines(Path(self.output, "metrics.jsonl"))
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line being written
        if since_last_start:  # this attempt only (after a --resume)
            starts = [i for i, m in enumerate(out) if m.get("event") == "start"]
            out = out[starts[-1]:] if starts else out
        return out

    def wait(self, timeout: float = 7 * 24 * 3600) -> FineTuneRun:
        self._client.wait(self.name, timeout, until=("finished",))
        return self

    def wait_served(self, timeout: float = 900):
        """With --serve: wait for the run to finish and its adapter to be served; returns the
        Served handle (its model name for the adapter is the run's name)."""
        deadline = time.monotonic() + timeout
        while getattr(self, "served", None) is None:
            if getattr(self, "serve_error", None):
                raise RuntimeError(self.serve_error)
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {self.name!r}: nothing served after {timeout:.0f}s")
            time.sleep(0.5)
        return self.served.wait_ready(max(1.0, deadline - time.monotonic()))



def finetune(model: str, data: str, **kw) -> FineTuneRun:
    """Start a fine-tune run (see %finetune). Bad input is refused before anything starts."""
    opts = check_options(FineTuneOptions(model=model, data=data, **kw))
    client = SessionClient()
    gpus = opts.gpus
    if gpus is None:
        gpus = 1 if client.session()["visible_gpus"] else 0
    Path(opts.output).mkdir(parents=True, exist_ok=True)
    ngpus = _count(gpus, client)
    try:
        client.create({"kind": "finetune", "name": opts.name, "gpus": gpus,
                       "argv": trainer_argv(opts, ngpus), "output": opts.output,
                       "model": opts.model})
    except ServiceRequestError as exc:
        raise FineTuneError(str(exc)) from None
    run = FineTuneRun(opts.name, client)
    if opts.serve:
        _serve_when_done(run)
    return run


def _serve_when_done(run: FineTuneRun) -> None:
    """serve=True: once the run has finished, serve what it wrote (in a thread, so the cell
    returns); ``run.wait_served()`` waits for it."""
    import threading

    def go():
        from .serving import serve

        try:
            run.wait()
            info, name = run.info, run.name[:36].rstrip("-") + "-srv"
            if Path(run.output, "adapter_config.json").is_file():
                run.served = serve(info["model"], name=name, loras={run.name: run.output})
            else:  # method full: the output is a model of its own
                run.served = serve(run.output, name=name)
        except Exception as exc:
            run.serve_error = f"serve after the run: nothing served: {exc}"

    threading.Thread(target=go, daemon=True).start()


def attach(name: str) -> FineTuneRun:
    """A run started by any kernel of this session, by name."""
    client = SessionClient()
    client.get(name)
    return FineTuneRun(name, client)


def _count(gpus, client: SessionClient) -> int:
    from aifab.extension.ledger import GPURequestError, parse_gpu_request

    try:
        kind, value = parse_gpu_request(gpus)
    except GPURequestError as exc:
        raise FineTuneError(str(exc)) from None
    if kind == "all":
        return len(client.session()["visible_gpus"])
    return int(value) if kind == "count" else len(value)
