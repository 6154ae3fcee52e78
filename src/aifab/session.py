"""The session contract: what the hub tells a single-user server about its placement.

The spawner sets these variables in the single-user server's environment; everything in the
session (server extension, magics, ``aifab doctor``) reads them through :func:`Session.from_env`.
Where they are missing (a server started by hand, a plain Slurm job) the session is detected
from what the scheduler itself sets, and ``source`` says so.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from .names import SLURM_NAME

BACKENDS = ("local", "slurm", "kubernetes")
CONTRACT_PREFIX = "AIFAB_"  # every name of the contract starts so
SLURM_PREFIX = "AIFAB_SLURM"  # where a Slurm session runs: the spawner's, never a profile's

ENV_BACKEND = "AIFAB_BACKEND"
ENV_PROFILE = "AIFAB_PROFILE"
ENV_GPUS = "AIFAB_GPUS"
ENV_WALLTIME_END = "AIFAB_WALLTIME_END"
ENV_SLURM_JOB_ID = "AIFAB_SLURM_JOB_ID"
ENV_POD_NAME = "AIFAB_POD_NAME"
# Where the session's Slurm job runs; dask worker jobs are submitted to the same place.
ENV_SLURM_PARTITION = "AIFAB_SLURM_PARTITION"
ENV_SLURM_ACCOUNT = "AIFAB_SLURM_ACCOUNT"
ENV_SLURM_RESERVATION = "AIFAB_SLURM_RESERVATION"
# Set by the spawner from the profile: the site's shared, read-only model cache.
ENV_MODEL_CACHE = "AIFAB_MODEL_CACHE"
ENV_IMAGE = "AIFAB_IMAGE"  # the image / uenv the user chose (Slurm sessions)
# The Slurm profiles this session may hold allocations of (JSON, aifab.allocation.Allowance)
ENV_ALLOCATABLE = "AIFAB_ALLOCATABLE"
# The session's own settings, not set by the spawner: where the server keeps its records, how
# a kernel or script reaches its Jupyter server, the dask interface, the tutorials' model.
ENV_STATE_DIR = "AIFAB_STATE_DIR"
ENV_SERVER_URL = "AIFAB_SERVER_URL"
ENV_SERVER_TOKEN = "AIFAB_SERVER_TOKEN"
ENV_PUBLIC_URL = "AIFAB_PUBLIC_URL"
ENV_DASK_INTERFACE = "AIFAB_DASK_INTERFACE"
ENV_TINY_MODEL = "AIFAB_TINY_MODEL"
CONTRACT_VARS = (
    ENV_BACKEND, ENV_PROFILE, ENV_GPUS, ENV_WALLTIME_END, ENV_SLURM_JOB_ID, ENV_POD_NAME,
    ENV_SLURM_PARTITION, ENV_SLURM_ACCOUNT, ENV_SLURM_RESERVATION,
)
# What a profile's `environment` may not set: the contract, and what the spawner derives.
SPAWNER_SET = (*CONTRACT_VARS, ENV_MODEL_CACHE, ENV_IMAGE, ENV_ALLOCATABLE)

# Slurm's own names for the same facts, used when the contract does not give them.
_SLURM_FALLBACK = {
    ENV_SLURM_PARTITION: "SLURM_JOB_PARTITION",
    ENV_SLURM_ACCOUNT: "SLURM_JOB_ACCOUNT",
    ENV_SLURM_RESERVATION: "SLURM_JOB_RESERVATION",
}

# A GPU as CUDA_VISIBLE_DEVICES / NVIDIA_VISIBLE_DEVICES name it: an index, a UUID or a MIG id.
_GPU_ID = re.compile(r"[0-9]{1,3}|(GPU|MIG)-[0-9A-Za-z/-]{1,80}")


class SessionContractError(ValueError):
    """An ``AIFAB_*`` variable holds something the contract does not allow."""


def parse_gpu_list(value: str | None, variable: str = "CUDA_VISIBLE_DEVICES") -> tuple[str, ...]:
    """Split a visible-devices variable into GPU ids; empty, 'none' and 'void' mean no GPU."""
    if value is None:
        return ()
    value = value.strip()
    if value in ("", "none", "void", "NoDevFiles"):
        return ()
    ids = tuple(part.strip() for part in value.split(","))
    for gpu in ids:
        if not _GPU_ID.fullmatch(gpu):
            raise SessionContractError(
                f"{variable}={value!r}: {gpu!r} is not a GPU index (0-999) or a GPU-/MIG- UUID"
            )
    return ids


@dataclass(frozen=True)
class Session:
    """Where this session runs and what it was given."""

    backend: str = "local"
    profile: str = ""
    gpu_count: int = 0
    visible_gpus: tuple[str, ...] = ()
    walltime_end: float | None = None
    slurm_job_id: str | None = None
    pod_name: str | None = None
    slurm_partition: str = ""
    slurm_account: str = ""
    slurm_reservation: str = ""
    source: str = "detected"  # "contract" when the AIFAB_* variables were set by the spawner
    notes: tuple[str, ...] = field(default=(), compare=False)

    def walltime_left(self, now: float | None = None) -> float | None:
        """Seconds until the allocation ends (never negative), or None for no limit."""
        if self.walltime_end is None:
            return None
        return max(0.0, self.walltime_end - (time.time() if now is None else now))

    def to_env(self) -> dict[str, str]:
        """The contract as environment variables (what the spawner hands the server)."""
        env = {
            ENV_BACKEND: self.backend,
            ENV_PROFILE: self.profile,
            ENV_GPUS: str(self.gpu_count),
        }
        if self.walltime_end is not None:
            env[ENV_WALLTIME_END] = str(int(self.walltime_end))
        if self.slurm_job_id:
            env[ENV_SLURM_JOB_ID] = self.slurm_job_id
        if self.pod_name:
            env[ENV_POD_NAME] = self.pod_name
        for name, value in ((ENV_SLURM_PARTITION, self.slurm_partition),
                            (ENV_SLURM_ACCOUNT, self.slurm_account),
                            (ENV_SLURM_RESERVATION, self.slurm_reservation)):
            if value:
                env[name] = value
        return env

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Session:
        """Read the contract, falling back to what Slurm / Kubernetes / CUDA set."""
        env = os.environ if env is None else env
        notes: list[str] = []
        visible = _visible_gpus(env)
        if env.get(ENV_BACKEND):
            backend = env[ENV_BACKEND]
            if backend not in BACKENDS:
                raise SessionContractError(
                    f"{ENV_BACKEND}={backend!r}: allowed are {', '.join(BACKENDS)}"
                )
            gpu_count = _int_var(env, ENV_GPUS, default=len(visible))
            end = env.get(ENV_WALLTIME_END)
            walltime_end = float(_int_var(env, ENV_WALLTIME_END, 0)) if end else None
            if gpu_count != len(visible) and visible:
                notes.append(
                    f"{ENV_GPUS}={gpu_count} but {len(visible)} GPU(s) are visible "
                    f"({','.join(visible)})"
                )
            return cls(
                backend=backend,
                profile=env.get(ENV_PROFILE, ""),
                gpu_count=gpu_count,
                visible_gpus=visible,
                walltime_end=walltime_end,
                slurm_job_id=env.get(ENV_SLURM_JOB_ID) or env.get("SLURM_JOB_ID"),
                pod_name=env.get(ENV_POD_NAME),
                **_slurm_place(env),
                source="contract",
                notes=tuple(notes),
            )
        if env.get("SLURM_JOB_ID"):
            backend = "slurm"
        elif env.get("KUBERNETES_SERVICE_HOST"):
            backend = "kubernetes"
        else:
            backend = "local"
        return cls(
            backend=backend,
            gpu_count=len(visible),
            visible_gpus=visible,
            slurm_job_id=env.get("SLURM_JOB_ID"),
            pod_name=env.get("HOSTNAME") if backend == "kubernetes" else None,
            **_slurm_place(env),
            source="detected",
        )


def _slurm_place(env: Mapping[str, str]) -> dict[str, str]:
    """Partition, account and reservation of the session's job (contract, else Slurm's)."""
    out = {}
    for name, fallback in _SLURM_FALLBACK.items():
        value = (env.get(name) or env.get(fallback) or "").strip()
        if value and not SLURM_NAME.fullmatch(value):
            raise SessionContractError(f"{name}={value!r}: letters, digits and _.+- only")
        out[name[len("AIFAB_"):].lower()] = value
    return out


def _visible_gpus(env: Mapping[str, str]) -> tuple[str, ...]:
    # CUDA_VISIBLE_DEVICES is what CUDA programs obey, so it wins; Kubernetes' device plugin
    # sets only NVIDIA_VISIBLE_DEVICES ("all" means every GPU the container was given).
    if "CUDA_VISIBLE_DEVICES" in env:
        return parse_gpu_list(env["CUDA_VISIBLE_DEVICES"])
    nvidia = env.get("NVIDIA_VISIBLE_DEVICES")
    if nvidia and nvidia.strip() != "all":
        return parse_gpu_list(nvidia, "NVIDIA_VISIBLE_DEVICES")
    return ()


def _int_var(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if not re.fullmatch(r"[0-9]{1,12}", raw.strip()):
        raise SessionContractError(f"{name}={raw!r}: must be a non-negative integer")
    return int(raw)
