"""``%finetune`` and ``%%finetune``: fine-tuning runs from a notebook cell."""

from __future__ import annotations

import argparse
import shlex

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from .parsing import MagicArgumentParser

USAGE = """%finetune MODEL DATA [--name N] [--method lora|full] [--epochs N | --max-steps N]
          [--lr F] [--batch-size N] [--grad-accum N] [--seq-len N] [--packing] [--lora-r N]
          [--lora-alpha N] [--gpus 2|0,1|all] [--output DIR] [--resume] [--serve]
          [--on ALLOCATION [--nodes N]]
%finetune list | %finetune stop NAME | %finetune logs NAME | %finetune attach NAME
%%finetune  (cell: the same options as YAML, e.g. model: ..., data: ..., max_steps: 60)"""

def _option_keys() -> tuple[str, ...]:
    """What %%finetune's YAML may set: FineTuneOptions' fields (the one list of options)."""
    import dataclasses

    from aifab.api import FineTuneOptions

    # serve: the kernel's own step after the run (it serves what the run wrote)
    return tuple(f.name for f in dataclasses.fields(FineTuneOptions)
                 if f.name not in ("model", "data")) + ("serve",)


def parse_finetune(line: str) -> tuple[str, dict]:
    """A %finetune line → (command, options). Pure."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"{exc}\nusage: {USAGE}") from None
    if not words:
        raise UsageError(f"usage: {USAGE}")
    if words[0] in ("list", "stop", "logs", "attach"):
        if words[0] != "list" and len(words) != 2:
            raise UsageError(f"%finetune {words[0]} NAME")
        return words[0], {"name": words[1] if len(words) > 1 else ""}
    # only the flags given: FineTuneOptions holds the defaults, in one place
    p = MagicArgumentParser(prog="%finetune", usage_text=USAGE, argument_default=argparse.SUPPRESS)
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("--name")
    p.add_argument("--method", choices=("lora", "full"))
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--epochs", type=float)
    steps.add_argument("--max-steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--packing", action="store_true")
    p.add_argument("--lora-r", type=int)
    p.add_argument("--lora-alpha", type=int)
    p.add_argument("--save-steps", type=int)
    p.add_argument("--gpus")
    p.add_argument("--output")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--serve", action="store_true")
    p.add_argument("--on")
    p.add_argument("--nodes", type=int)
    opts = vars(p.parse_args(words))
    if str(opts.get("gpus", "")).isdigit():
        opts["gpus"] = int(opts["gpus"])
    return "run", opts


def options_from_yaml(text: str) -> dict:
    import yaml

    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"%%finetune: the cell is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError("%%finetune: the cell must be a YAML mapping (model: ..., data: ...)")
    keys = _option_keys()
    unknown = sorted(set(data) - set(keys) - {"model", "data"})
    if unknown:
        raise UsageError(f"%%finetune: unknown key(s) {', '.join(unknown)}; allowed: model, "
                         f"data, {', '.join(keys)}")
    for key in ("model", "data"):
        if key not in data:
            raise UsageError(f"%%finetune: '{key}' is required")
    return data


@magics_class
class FineTuneMagics(Magics):
    @line_magic
    def finetune(self, line: str):
        command, opts = parse_finetune(line)
        return self._dispatch(command, opts)

    @cell_magic("finetune")
    def finetune_cell(self, line: str, cell: str):
        opts = options_from_yaml(cell)
        if line.strip():
            raise UsageError("%%finetune takes its options from the cell (YAML), not the line")
        return self._dispatch("run", opts)

    def _dispatch(self, command: str, opts: dict):
        from IPython.display import display

        from aifab.magics.client import ServiceRequestError, SessionClient
        from aifab.magics.finetuning import FineTuneError, attach, finetune

        from .finetune_widget import FineTuneWidget

        try:
            if command == "list":
                runs = [s for s in SessionClient().services() if s["kind"] == "finetune"]
                for s in runs:
                    print(f"{s['name']:<28} {s['status']:<9} gpus=[{','.join(s['gpus'])}] "
                          f"{s['output']}")
                if not runs:
                    print("no fine-tune runs in this session")
                return None
            if command == "stop":
                SessionClient().stop(opts["name"])
                print(f"stopped {opts['name']} (its last checkpoint stays; --resume continues)")
                return None
            if command == "logs":
                print("\n".join(SessionClient().logs(opts["name"], 50)))
                return None
            if command == "attach":
                run = attach(opts["name"])
            else:
                model, data = opts.pop("model"), opts.pop("data")
                run = finetune(model, data, **opts)
        except (ServiceRequestError, FineTuneError, TypeError) as exc:
            raise UsageError(str(exc)) from None
        run.widget = FineTuneWidget(run)
        display(run.widget)
        return run
