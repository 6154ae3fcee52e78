"""``%serve``: vLLM on the session's GPUs from a notebook cell."""

from __future__ import annotations

import argparse
import shlex

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class

from .parsing import MagicArgumentParser

USAGE = """%serve MODEL [--name N] [--gpus 2|0,1|all] [--tp auto|N] [--max-model-len N]
       [--gpu-memory-utilization F] [--lora NAME=PATH ...] [--on ALLOCATION] [--wait]
       [--share GROUP[,GROUP]] [-- extra vllm args]
%serve MODEL --deploy --replicas N --until 2026-12-20T18:00 --share GROUP[,GROUP]
       [--name N] [--gpus N] [--max-model-len N]
%serve list [--all] | %serve stop NAME | %serve logs NAME [-n 50]
%serve share NAME GROUP[,GROUP] | %serve unshare NAME
%serve deployments | %serve undeploy NAME"""


def parse_serve(line: str) -> tuple[str, argparse.Namespace, list[str]]:
    """Split a %serve line into (command, options, extra vLLM args). Pure."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"{exc}\nusage: {USAGE}") from None
    extra: list[str] = []
    if "--" in words:
        i = words.index("--")
        words, extra = words[:i], words[i + 1:]
    if not words:
        raise UsageError(f"usage: {USAGE}")
    if words[0] in ("list", "stop", "logs", "share", "unshare", "deployments", "undeploy"):
        p = MagicArgumentParser(prog=f"%serve {words[0]}", usage_text=USAGE)
        if words[0] == "deployments":
            pass
        elif words[0] == "list":
            p.add_argument("--all", action="store_true", help="ended servers too")
        else:
            p.add_argument("name")
        if words[0] == "share":
            p.add_argument("groups", type=_groups)
        if words[0] == "logs":
            p.add_argument("-n", type=int, default=50)
        return words[0], p.parse_args(words[1:]), extra
    p = MagicArgumentParser(prog="%serve", usage_text=USAGE)
    p.add_argument("model")
    p.add_argument("--name")
    p.add_argument("--gpus")
    p.add_argument("--tp", default="auto")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument("--lora", action="append", default=[])
    p.add_argument("--wait", action="store_true")
    p.add_argument("--on")
    p.add_argument("--share", type=_groups, default=[])
    p.add_argument("--deploy", action="store_true")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--until")
    opts = p.parse_args(words)
    if opts.deploy and not (opts.until and opts.share):
        raise UsageError(f"--deploy needs --until TIME and --share GROUP[,GROUP]\n"
                         f"usage: {USAGE}")
    if not opts.deploy and (opts.until or opts.replicas != 1):
        raise UsageError(f"--until and --replicas go with --deploy\nusage: {USAGE}")
    loras = {}
    for item in opts.lora:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--lora {item!r}: expected NAME=PATH")
        loras[name] = path
    opts.loras = loras
    if opts.tp != "auto":
        if not opts.tp.isdigit():
            raise UsageError(f"--tp {opts.tp!r}: auto or a number")
        opts.tp = int(opts.tp)
    return "serve", opts, extra


def deployment_lines(items: list[dict]) -> list[str]:
    """One line per deployment and one per replica job, for ``%serve deployments``."""
    if not items:
        return ["no deployments"]
    out = []
    for d in items:
        out.append(f"{d['id']}  {len(d['jobs'])}/{d['deployment']['replicas']} replicas, "
                   f"until {d['labels'].get('until', '?')}, for {', '.join(d['groups'])}")
        for job, info in d["jobs"].items():
            healthy = d["health"].get(info["url"]) if info.get("url") else None
            out.append(f"  job {job}  {info['state'].lower()}  {info['node'] or '-'}  "
                       f"{'serving' if healthy else 'not serving'}")
    return out


def list_lines(services: list[dict], show_all: bool = False) -> list[str]:
    """The lines of ``%serve list``: the session's model servers (not its fine-tune runs),
    the live ones unless ``show_all``. Pure."""
    from aifab.api import LIVE

    rows = [s for s in services if s["kind"] == "vllm" and (show_all or s["status"] in LIVE)]
    lines = []
    for s in rows:
        adapters = f" adapters: {', '.join(s['loras'])}" if s.get("loras") else ""
        lines.append(f"{s['name']:<20} {s['status']:<8} "
                     f"{('gpus=' + ','.join(s['gpus'])) if s['gpus'] else 'cpu':<10} "
                     f"model {s['served_name'] or s['name']} ({s['model']}){adapters}")
    if not lines:
        ended = sum(1 for s in services if s["kind"] == "vllm")
        lines.append("no model servers running in this session"
                     + (f" ({ended} ended: %serve list --all)" if ended and not show_all else ""))
    return lines


def _groups(value: str) -> list[str]:
    groups = [g for g in value.split(",") if g]
    if not groups:
        raise argparse.ArgumentTypeError("GROUP[,GROUP]: one hub group or more")
    return groups


@magics_class
class ServeMagics(Magics):
    def _deployments(self, command: str, opts):
        from aifab import published as models

        try:
            if command == "deployments":
                print("\n".join(deployment_lines(models.deployments())))
            elif command == "undeploy":
                models.undeploy(opts.name)
                print(f"undeployed {opts.name}: its replica jobs are cancelled")
            else:
                from .serving import default_name

                record = models.deploy(
                    opts.model, opts.name or default_name(opts.model), until=opts.until,
                    groups=opts.share, replicas=opts.replicas, gpus=int(opts.gpus or 0),
                    max_model_len=opts.max_model_len)
                print(f"deploying {record['id']}: {opts.replicas} replica job(s) "
                      f"{record['labels'].get('slurm.jobs', '')}, until "
                      f"{record['labels'].get('until')}; `%serve deployments` shows them")
                return record
        except RuntimeError as exc:
            raise UsageError(str(exc)) from None
        return None

    @line_magic
    def serve(self, line: str):
        from aifab.magics.client import ServiceRequestError, SessionClient
        from aifab.magics.serving import Served, serve

        command, opts, extra = parse_serve(line)
        try:
            if command == "list":
                print("\n".join(list_lines(SessionClient().services(), opts.all)))
                return None
            if command == "stop":
                SessionClient().stop(opts.name)
                print(f"stopped {opts.name}")
                return None
            if command == "logs":
                print("\n".join(SessionClient().logs(opts.name, opts.n)))
                return None
            if command == "share":
                record = Served(opts.name).publish(opts.groups)
                print(f"published {record['id']} to {', '.join(record['groups'])}: "
                      f"{record['url']}")
                return None
            if command == "unshare":
                Served(opts.name).unpublish()
                print(f"{opts.name} is no longer published")
                return None
            if command in ("deployments", "undeploy") or opts.deploy:
                return self._deployments(command, opts)
            gpus = opts.gpus
            if gpus is not None and gpus.isdigit():
                gpus = int(gpus)
            served: Served = serve(
                opts.model, name=opts.name, gpus=gpus, tensor_parallel=opts.tp,
                max_model_len=opts.max_model_len,
                gpu_memory_utilization=opts.gpu_memory_utilization, loras=opts.loras,
                extra_args=extra, on=opts.on, share=opts.share)
        except ServiceRequestError as exc:
            raise UsageError(str(exc)) from None
        from .serve_widget import ServeWidget

        widget = served.widget = ServeWidget(served)
        from IPython.display import display

        display(widget)
        if opts.wait:
            served.wait_ready()
        return served
