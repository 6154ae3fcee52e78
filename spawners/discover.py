"""Profiles from a reachable Slurm's own partitions, for the demo and quick setups.

A site writes its profiles by hand (docs/examples/alps-profiles.yaml); ``make demo`` on a
machine that can reach a Slurm offers one profile per partition, sized from what ``sinfo``
reports, so a newcomer sees the Slurm placement without writing YAML.
"""

from __future__ import annotations

import re

from aifab import slurm
from aifab.names import SLURM_NAME
from aifab.walltime import format_walltime, parse_walltime

SINFO_FORMAT = "%R|%G|%c|%m|%l"  # partition | gres | cpus/node | memory MB/node | time limit
_GPU_GRES = re.compile(r"gpu(?::([A-Za-z0-9_-]+))?:(\d+)")
DEFAULT_MAX_WALLTIME = 12 * 3600


def profiles_from_sinfo(text: str) -> list[dict]:
    """Pure: sinfo output in SINFO_FORMAT → profile dicts (one per partition)."""
    profiles: dict[str, dict] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 5 or not SLURM_NAME.fullmatch(parts[0]) or parts[0] in profiles:
            continue
        name, gres, cpus, mem, limit = parts
        gpu = _GPU_GRES.search(gres)
        gpus, gpu_type = (int(gpu.group(2)), gpu.group(1) or "") if gpu else (0, "")
        ncpu = int(cpus.rstrip("+")) if cpus.rstrip("+").isdigit() else 1
        mem_gb = max(1, int(mem.rstrip("+")) // 1024) if mem.rstrip("+").isdigit() else 1
        try:
            max_wall = min(parse_walltime(limit), DEFAULT_MAX_WALLTIME)
        except ValueError:  # "infinite", "UNLIMITED": Slurm's own spellings of no limit
            max_wall = DEFAULT_MAX_WALLTIME
        slug = "slurm-" + re.sub(r"[^a-z0-9-]", "-", name.lower())[:30].strip("-")
        profiles[name] = {
            "slug": slug,
            "display_name": f"Slurm partition {name}" + (f" ({gpus} GPUs per node)"
                                                         if gpus else ""),
            "description": "A session in a Slurm job; log in with your Unix user name.",
            "backend": "slurm",
            "choices": {
                "gpus": {"default": min(1, gpus), "min": 0, "max": gpus},
                "cpus": {"default": min(4, ncpu), "min": 1, "max": ncpu},
                "memory_gb": {"default": min(8, mem_gb), "min": 1, "max": mem_gb},
                "walltime": {"default": format_walltime(min(3600, max_wall)),
                             "max": format_walltime(max_wall)},
            },
            "slurm": {"partition": name, **({"gres_type": gpu_type} if gpu_type else {})},
        }
    return list(profiles.values())


def discover_slurm_profiles(timeout: float = 3) -> list[dict]:
    """One profile per partition of the Slurm this machine reaches; [] if there is none."""
    if not slurm.have_client():
        return []
    try:
        out = slurm.run(["sinfo", "-h", "-o", SINFO_FORMAT], timeout=timeout)
    except slurm.SlurmError:
        return []
    return profiles_from_sinfo(out)
