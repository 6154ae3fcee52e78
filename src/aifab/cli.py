"""The ``aifab`` command."""

from __future__ import annotations

import argparse
import json
import sys


def _kernels_install(args: argparse.Namespace) -> int:
    from aifab.kernels import DISPLAY_NAME, install

    path = install(user=args.user, sys_prefix=args.sys_prefix, prefix=args.prefix)
    print(f"Installed kernel spec {DISPLAY_NAME!r} in {path}")
    return 0


def _kernels_show(args: argparse.Namespace) -> int:
    from aifab.kernels import kernel_spec

    print(json.dumps(kernel_spec(), indent=2))
    return 0


def _tiny_model(args: argparse.Namespace) -> int:
    from aifab.magics.tiny_model import build

    try:
        summary = build(args.dir)
    except (FileExistsError, RuntimeError) as exc:
        print(f"aifab tiny-model: {exc}", file=sys.stderr)
        return 1
    print(
        f"Built a tiny random Llama ({summary['params']:,} parameters, vocabulary "
        f"{summary['vocab']}) in {summary['path']}.\nTry it: %serve {summary['path']}"
    )
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from aifab.magics.doctor import format_checks, run_checks, to_json

    checks = run_checks()
    print(to_json(checks) if args.json else format_checks(checks))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aifab", description="jupyter-aifab command line")
    sub = p.add_subparsers(dest="command", required=True)

    k = sub.add_parser("kernels", help="kernel spec 'Python 3 (aifab)'")
    ksub = k.add_subparsers(dest="kernels_command", required=True)
    ki = ksub.add_parser("install", help="install the kernel spec")
    where = ki.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="for the current user only")
    where.add_argument("--sys-prefix", action="store_true",
                       help="into this Python environment (sys.prefix)")
    where.add_argument("--prefix", help="under this prefix")
    ki.set_defaults(func=_kernels_install)
    ks = ksub.add_parser("show", help="print the kernel spec as JSON")
    ks.set_defaults(func=_kernels_show)

    t = sub.add_parser("tiny-model", help="build a tiny random model offline (no download)")
    t.add_argument("dir", help="output directory (must be new or empty)")
    t.set_defaults(func=_tiny_model)

    d = sub.add_parser("doctor", help="what this session sees: placement, Slurm, GPUs, packages")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.set_defaults(func=_doctor)

    from aifab.spawners.loadtest import build_parser as loadtest_parser

    loadtest_parser(sub)

    r = sub.add_parser("config-reference",
                       help="print the configuration reference (docs/config-reference.md)")
    r.set_defaults(func=lambda _args: __import__("aifab.config_reference",
                                                  fromlist=["main"]).main())
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
