"""The fine-tune service kind: a run of the trainer (``aifab.extension.trainer``), one process
per GPU under torchrun or one on the CPU, never inside a kernel.

Every option is checked here, on the server, whoever sends the request (``%finetune``,
``aifab.finetune()`` or any REST client), and the server builds the trainer's command line
from the checked options: no request brings its own argv.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import signal
import time
from collections.abc import Mapping
from pathlib import Path

from aifab.api import BadRequest, FineTuneOptions, Status
from aifab.models import cached_models, offline_refusal, resolve
from aifab.names import HF_MODEL_ID, SERVICE_NAME, SERVICE_NAME_RULE

from .. import steps
from ..records import Service, tail
from ..train_data import DataError, inspect_data
from ..trainer import COMPLETE
from .base import LaunchPlan, ServiceKind, base_env

RUN_FILE = "aifab-run.json"  # written by the trainer when the run is done
# the first node's port of a multi-node run's rendezvous: one of these, at random, above
# torch's customary 29500 (the server cannot ask another machine for a free port before the
# step starts there)
RDZV_PORTS = (29510, 490)
EXIT_INTERRUPTED = 75  # the trainer's "stopped early, checkpoint saved"
# what a --resume must keep equal (the checkpoint's shapes and the data order)
RESUME_SHAPE = ("model", "method", "lora_r", "lora_alpha", "batch_size", "grad_accum",
                "seq_len", "packing", "nodes")


def check_options(o: FineTuneOptions) -> FineTuneOptions:
    """Everything that can be checked before a process starts. Raises BadRequest."""
    model = resolve(o.model)  # a name in the site's shared model cache, if there is one
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise BadRequest(f"model {o.model!r}: the directory has no config.json")
        o.model = os.path.abspath(model)
    elif model.startswith(("/", ".", "~")) or not HF_MODEL_ID.fullmatch(model):
        cached = ", ".join(cached_models())
        raise BadRequest(f"model {o.model!r}: no such model directory (and not a Hugging "
                         "Face id like org/name)"
                         + (f"; the shared model cache has: {cached}" if cached else ""))
    elif refusal := offline_refusal(model):
        raise BadRequest(refusal)
    try:
        inspect_data(o.data)
    except DataError as exc:
        raise BadRequest(str(exc)) from None
    o.data = os.path.abspath(os.path.expanduser(o.data))
    if o.method not in ("lora", "full"):
        raise BadRequest(f"method {o.method!r}: lora or full")
    if o.epochs is not None and not o.epochs > 0:
        raise BadRequest(f"epochs={o.epochs!r}: more than 0")
    o.name = o.name or default_run_name(o.model)
    if not SERVICE_NAME.fullmatch(o.name):
        raise BadRequest(f"name {o.name!r}: {SERVICE_NAME_RULE}")
    for fname, lo in (("batch_size", 1), ("grad_accum", 1), ("seq_len", 16), ("lora_r", 1),
                      ("lora_alpha", 1), ("save_steps", 1)):
        value = getattr(o, fname)
        if not isinstance(value, int) or value < lo:
            raise BadRequest(f"{fname}={value!r}: an integer >= {lo}")
    if o.max_steps is not None and (not isinstance(o.max_steps, int) or o.max_steps < 1):
        raise BadRequest(f"max_steps={o.max_steps!r}: an integer >= 1")
    if not 0 < o.lr < 1:
        raise BadRequest(f"lr={o.lr!r}: a learning rate between 0 and 1")
    out = Path(os.path.expanduser(o.output or f"~/aifab-runs/{o.name}")).absolute()
    if out.exists() and any(out.iterdir()):
        owner = run_name(out)
        if not o.resume or owner not in (o.name, None):
            what = f"run {owner!r}" if owner else "other files"
            raise BadRequest(
                f"output {str(out)!r} holds {what}; choose another --output"
                + (", or --resume to continue it" if owner == o.name else ""))
    o.output = str(out)
    if o.resume:
        _check_resume_shape(o, out)
    return o


def _check_resume_shape(o: FineTuneOptions, out: Path) -> None:
    starts = [json.loads(line) for line in _lines(out / "metrics.jsonl")
              if '"event": "start"' in line]
    if not starts or "shape" not in starts[-1]:
        return
    was = {"nodes": 1, **starts[-1]["shape"]}  # (runs before multi-node ones ran on one)
    changed = [f"{k} {was[k]!r} -> {getattr(o, k)!r}" for k in RESUME_SHAPE
               if k in was and was[k] != getattr(o, k)]
    if changed:
        raise BadRequest("--resume must keep the run's settings; changed: " + ", ".join(changed))


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError:
        return []


def run_name(out: Path) -> str | None:
    """The name of the run that wrote ``out`` (None if none did)."""
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


def trainer_argv(python: str, o: FineTuneOptions, ngpus: int, *, master: str = "") -> list[str]:
    """The trainer's command line: one process on the CPU or one GPU; torchrun with one
    process per GPU; with ``master`` (ADDRESS:PORT of the first node), torchrun on each of
    ``o.nodes`` nodes, meeting there. The static rendezvous, each node's rank from Slurm
    (``aifab.extension.node_rank``): torch's c10d rendezvous unpickles what its store holds,
    and that store answers anyone who reaches its port."""
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
    # torchrun passes Slurm's SIGUSR1 on to its processes; a rank that dies ends the run (no
    # restarts: the run fails with its last checkpoint, and --resume goes on from there)
    torchrun = [python, "-m", "torch.distributed.run", "--max-restarts=0",
                "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
                "--shutdown-timeout=50", f"--nproc-per-node={max(ngpus, 1)}"]
    if master:
        addr, port = master.rsplit(":", 1)
        return [python, "-m", "aifab.extension.node_rank", *torchrun, f"--nnodes={o.nodes}",
                "--rdzv-backend=static", f"--master-addr={addr}", f"--master-port={port}",
                *args]
    if ngpus > 1:  # one process per GPU
        return [*torchrun, "--standalone", *args]
    return [python, *args]


def run_outcome(output: str) -> tuple[Status, str] | None:
    """A run's outcome from what it wrote (exit codes do not survive torchrun or a restart of
    the Jupyter server): (status, error), or None if it says nothing."""
    if not output:
        return None
    out = Path(output)
    if (out / RUN_FILE).is_file():
        return (Status.FINISHED, "")
    last = tail(out / "metrics.jsonl", 1)
    if last and '"event": "interrupted"' in last[-1]:
        return (Status.FAILED, "interrupted (SIGTERM/SIGUSR1 or walltime): a checkpoint was "
                               "saved; continue with --resume")
    return None


class FineTuneKind(ServiceKind):
    name = "finetune"
    one_shot = True
    fields = tuple(f for f in FineTuneOptions.field_names() if f not in ("name", "gpus"))
    slow_validation = True  # reads the whole data set once

    def __init__(self, ctx):
        super().__init__(ctx)
        self._node_addrs: dict[tuple[str, str], str] = {}  # (job, node) -> its NodeAddr

    def validate(self, spec: Mapping) -> FineTuneOptions:
        self.check_fields(spec)
        body = {k: v for k, v in spec.items() if k != "kind"}
        options = check_options(FineTuneOptions.from_request(body))
        if not isinstance(options.nodes, int) or options.nodes < 1:
            raise BadRequest(f"nodes={options.nodes!r}: 1 or more (of an allocation's nodes)")
        if options.on:
            alloc = self.allocation(options.on)
            if options.nodes > len(alloc.nodes):
                raise BadRequest(f"nodes={options.nodes}: allocation {options.on!r} has "
                                 f"{len(alloc.nodes)} node(s) ({', '.join(alloc.nodes)})")
            if options.nodes > 1:  # where the first node's torchrun listens (off the loop here)
                self._node_addrs[(alloc.job_id, alloc.nodes[0])] = \
                    steps.first_node_address(alloc, options.on)
        elif options.nodes > 1:
            raise BadRequest(f"nodes={options.nodes}: a run on several nodes runs in an "
                             "allocation of that many nodes: add on=ALLOCATION (%alloc)")
        return options

    def plan(self, request: FineTuneOptions, *, name: str, gpus: list[str], service_dir: Path,
             api_key: str) -> LaunchPlan:
        Path(request.output).mkdir(parents=True, exist_ok=True)
        env = base_env(self.ctx.environ, gpus)
        slurm_step = ""
        if request.on:
            alloc = self.allocation(request.on)
            # the step gets all of the allocation's GPUs; the trainer keeps the ledger's share
            step = steps.step_name("run", name)
            # several nodes: one torchrun on each, meeting at the first node's address
            master = ""
            if request.nodes > 1:
                addr = self._node_addrs.get((alloc.job_id, alloc.nodes[0]), alloc.nodes[0])
                master = f"{addr}:{RDZV_PORTS[0] + secrets.randbelow(RDZV_PORTS[1])}"
            argv = trainer_argv(self.ctx.python, request, len(gpus), master=master)
            argv = steps.step_argv(alloc, step, argv, nodes=request.nodes)
            env = {**steps.node_env(env), **steps.contract(alloc),
                   **steps.gpu_positions(alloc, gpus)}
            slurm_step = f"{alloc.job_id}|{step}"
        else:
            argv = trainer_argv(self.ctx.python, request, len(gpus))
        return LaunchPlan(argv=argv, env=env, model=request.model, output=request.output,
                          request={**dataclasses.asdict(request), "resume": False},
                          slurm_step=slurm_step)

    def stop_signal(self, svc: Service) -> signal.Signals:
        # srun turns a SIGTERM into the step's cancel (SIGKILL after Slurm's KillWait) but
        # passes SIGUSR1 on to the task: the trainer checkpoints on it and exits
        return signal.SIGUSR1 if svc.slurm_step else signal.SIGTERM

    def ended(self, svc: Service) -> None:
        # a run whose srun was killed lives on on the node; each launch has a step name of
        # its own, so this never ends a resumed attempt's step
        steps.end_step_soon(svc.slurm_step)

    def resume_request(self, svc: Service) -> dict:
        if not svc.request:
            raise BadRequest(f"run {svc.name!r} was started by an earlier version that kept no "
                             "options: continue it with %finetune and the same options plus "
                             "--resume")
        if svc.status == Status.FINISHED:
            raise BadRequest(f"run {svc.name!r} finished: there is nothing to resume")
        checkpoints = Path(svc.output, "checkpoints").glob(f"checkpoint-*/{COMPLETE}")
        if not any(checkpoints):
            raise BadRequest(f"run {svc.name!r} saved no complete checkpoint: start it again "
                             "(a new --output, or the same one once emptied)")
        return {**svc.request, "kind": self.name, "name": svc.name, "resume": True}

    def outcome(self, svc: Service) -> tuple[Status, str] | None:
        return run_outcome(svc.output)
