"""Slurm allocations a session may hold: what the hub allows (an ``Allowance`` per Slurm
profile the user may use, handed to the session as ``AIFAB_ALLOCATABLE``) and a checked
request. Shared by the hub, which writes the allowances, the server, which checks every
request against them, and the kernel's ``aifab.allocate``, which shows the same messages.

Pure: importing this module starts nothing and touches no file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from .api import BadRequest
from .names import SERVICE_NAME, SERVICE_NAME_RULE, SLURM_NAME
from .walltime import format_walltime, parse_walltime

REQUEST_FIELDS = ("name", "profile", "nodes", "gpus", "cpus", "memory_gb", "walltime",
                  "reservation", "account")
GRES_TYPE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class Allowance:
    """One Slurm profile, as far as allocations go: where they run and their bounds."""

    profile: str
    partition: str = ""
    account: str = ""
    qos: str = ""
    reservation: str = ""
    constraint: str = ""
    gres_type: str = ""
    max_nodes: int = 1
    max_gpus: int = 0  # per node
    max_cpus: int = 1  # per node
    max_memory_gb: int = 2  # per node
    max_walltime_s: int = 3600
    default_walltime_s: int = 3600

    def describe(self) -> str:
        return (f"{self.profile}: up to {self.max_nodes} node(s), {self.max_gpus} GPU(s), "
                f"{self.max_cpus} CPUs and {self.max_memory_gb} GiB per node, "
                f"{format_walltime(self.max_walltime_s)}")


def allowances_to_env(allowances: Sequence[Allowance]) -> str:
    return json.dumps([asdict(a) for a in allowances], separators=(",", ":"))


def allowances_from_env(value: str | None) -> list[Allowance]:
    """What the hub handed the session; [] when it handed nothing (a server started by hand
    may hold no allocation: nobody said what it may ask for)."""
    if not value:
        return []
    try:
        raw = json.loads(value)
        out = [Allowance(**item) for item in raw]
    except (ValueError, TypeError) as exc:
        raise ValueError(f"AIFAB_ALLOCATABLE is not a list of allowances: {exc}") from None
    for a in out:
        for what in ("partition", "account", "qos", "reservation", "constraint"):
            value = getattr(a, what)
            if value and not SLURM_NAME.fullmatch(value):
                raise ValueError(f"AIFAB_ALLOCATABLE: {a.profile}.{what}={value!r}")
        if a.gres_type and not GRES_TYPE.fullmatch(a.gres_type):
            raise ValueError(f"AIFAB_ALLOCATABLE: {a.profile}.gres_type={a.gres_type!r}")
    return out


@dataclass(frozen=True)
class AllocationRequest:
    """A request checked against its profile's allowance: every value is Slurm's to take."""

    name: str
    allowance: Allowance
    nodes: int = 1
    gpus: int = 0  # per node
    cpus: int = 1  # per node
    memory_gb: int = 2  # per node
    walltime_s: int = 3600
    extra: Mapping[str, str] = field(default_factory=dict)

    def sbatch_args(self) -> list[str]:
        """The allocation's size and place as sbatch arguments (argv, no shell)."""
        a = self.allowance
        args = [f"--nodes={self.nodes}", "--ntasks-per-node=1",
                f"--cpus-per-task={self.cpus}", f"--mem={self.memory_gb}G",
                f"--time={format_walltime(self.walltime_s)}"]
        if self.gpus:
            args.append(f"--gres=gpu:{a.gres_type}:{self.gpus}" if a.gres_type
                        else f"--gres=gpu:{self.gpus}")
        for flag, value in (("partition", a.partition), ("account", a.account),
                            ("qos", a.qos), ("reservation", a.reservation),
                            ("constraint", a.constraint)):
            if value:
                args.append(f"--{flag}={value}")
        return args

    def to_dict(self) -> dict:
        return {"name": self.name, "profile": self.allowance.profile, "nodes": self.nodes,
                "gpus": self.gpus, "cpus": self.cpus, "memory_gb": self.memory_gb,
                "walltime": format_walltime(self.walltime_s),
                "partition": self.allowance.partition}


def _int(raw: Mapping, key: str, default: int, lo: int, hi: int, what: str) -> int:
    value = raw.get(key, default)
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,6}", value.strip()):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"{key}: a whole number of {what}, got {value!r}")
    if not lo <= value <= hi:
        raise BadRequest(f"{key}={value}: this profile allows {lo} to {hi} {what}")
    return value


def check_request(raw: object, allowances: Sequence[Allowance]) -> AllocationRequest:
    """The request, checked; BadRequest names the field and what is allowed."""
    if not isinstance(raw, Mapping):
        raise BadRequest("an allocation request is a JSON object "
                         f"with {', '.join(REQUEST_FIELDS)}")
    unknown = sorted(set(raw) - set(REQUEST_FIELDS))
    if unknown:
        raise BadRequest(f"{unknown[0]!r} is not a field of an allocation; allowed: "
                         f"{', '.join(REQUEST_FIELDS)}")
    if not allowances:
        raise BadRequest("this session may not hold Slurm allocations: the hub gave it no "
                         "Slurm profile (AIFAB_ALLOCATABLE)")
    by_slug = {a.profile: a for a in allowances}
    profile = raw.get("profile") or allowances[0].profile
    if not isinstance(profile, str) or profile not in by_slug:
        raise BadRequest(f"profile {profile!r} is not one you may allocate; allowed: "
                         f"{', '.join(by_slug)}")
    a = by_slug[profile]
    name = raw.get("name") or "alloc"
    if not isinstance(name, str) or not SERVICE_NAME.fullmatch(name):
        raise BadRequest(f"name {name!r}: {SERVICE_NAME_RULE}")
    for key in ("reservation", "account"):  # the profile's own, or nothing
        value = raw.get(key)
        if value not in (None, "", getattr(a, key)):
            allowed = getattr(a, key) or "none"
            raise BadRequest(f"{key} {value!r}: profile {profile!r} allows {allowed}")
    walltime = raw.get("walltime")
    try:  # Slurm's spellings; a number is minutes, as for sbatch --time
        walltime_s = a.default_walltime_s if walltime is None else parse_walltime(walltime)
    except ValueError as exc:
        raise BadRequest(f"walltime: {exc}") from None
    if not 60 <= walltime_s <= a.max_walltime_s:
        raise BadRequest(f"walltime {format_walltime(walltime_s)}: profile {profile!r} allows "
                         f"1 minute to {format_walltime(a.max_walltime_s)}")
    return AllocationRequest(
        name=name, allowance=a,
        nodes=_int(raw, "nodes", 1, 1, a.max_nodes, "nodes"),
        gpus=_int(raw, "gpus", min(1, a.max_gpus), 0, a.max_gpus, "GPUs per node"),
        cpus=_int(raw, "cpus", min(8, a.max_cpus), 1, a.max_cpus, "CPUs per node"),
        memory_gb=_int(raw, "memory_gb", min(16, a.max_memory_gb), 1, a.max_memory_gb,
                       "GiB per node"),
        walltime_s=walltime_s,
    )
