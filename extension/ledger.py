"""The GPU ledger: which of the session's GPUs each service holds.

Pure functions over (visible GPUs, what each live service holds). The holdings are derived
from the service records, never kept separately, so the ledger cannot drift from reality:
a service that exits stops holding its GPUs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from aifab.gpus import GPURequestError, GPUsBusy, parse_gpu_request

__all__ = ["GPURequestError", "GPUsBusy", "allocate", "describe_holders", "parse_gpu_request"]


def describe_holders(held: Mapping[str, Sequence[str]]) -> str:
    parts = [f"GPU {','.join(g)} held by {name!r}" for name, g in sorted(held.items()) if g]
    return "; ".join(parts) or "none held"


def allocate(spec, visible: Sequence[str], held: Mapping[str, Sequence[str]]) -> list[str]:
    """The GPUs (as the session's CUDA_VISIBLE_DEVICES names them) to give a new service.

    ``visible`` are the session's GPUs. In a request, numbers are positions in that list
    (the session's cuda:0, cuda:1, ...), never the names Slurm gave them; a GPU can also be
    named by its UUID as listed."""
    kind, value = parse_gpu_request(spec)
    # only this pool's holders count (an allocation's GPUs are a pool of their own)
    pool = set(visible)
    held = {n: [g for g in gpus if g in pool] for n, gpus in held.items()}
    held = {n: gpus for n, gpus in held.items() if gpus}
    taken = {g for gpus in held.values() for g in gpus}
    free = [g for g in visible if g not in taken]
    if kind == "count":
        n = int(value)
        if n == 0:
            return []
        if n > len(visible):
            raise GPURequestError(f"{n} GPU(s) requested but this session has "
                                  f"{len(visible)} ({','.join(visible) or 'none'})")
        if n > len(free):
            raise GPUsBusy(f"{n} GPU(s) requested but {len(free)} free: "
                                  f"{describe_holders(held)}. Stop one of those services or "
                                  "ask for fewer GPUs")
        return free[:n]
    if kind == "all":
        if not visible:
            raise GPURequestError("gpus=all but this session has no GPU")
        if taken:
            raise GPUsBusy(f"gpus=all but some are in use: {describe_holders(held)}")
        return list(visible)
    wanted = []
    for gid in value:
        if gid.isdigit():
            name = visible[int(gid)] if int(gid) < len(visible) else None
        else:
            name = gid if gid in visible else None
        if name is None:
            raise GPURequestError(f"GPU {gid} is not one of this session's GPUs "
                                  f"({','.join(visible) or 'none'})")
        if name in taken:
            holder = next(n for n, g in held.items() if name in g)
            raise GPUsBusy(f"GPU {gid} is held by {holder!r}; "
                                  f"free: {','.join(free) or 'none'}")
        wanted.append(name)
    if len(set(wanted)) != len(wanted):
        raise GPURequestError(f"gpus={spec!r} names a GPU twice")
    return wanted
