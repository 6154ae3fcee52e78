"""GPU requests (``gpus=2``, ``0,1``, ``all``) and which physical GPUs this session sees.

NVML enumerates every GPU the process can open and ignores CUDA_VISIBLE_DEVICES, so a
dashboard that asks NVML directly shows the whole node. We map the session's *visible* ids
(indices or UUIDs, as Slurm or Kubernetes set them) onto NVML's devices first and report
only those.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .api import BadRequest, Conflict


class GPURequestError(BadRequest):
    """A GPU request that cannot be met by this session at all (HTTP 400)."""


class GPUsBusy(GPURequestError, Conflict):
    """A GPU request this session could meet, but the GPUs are held (HTTP 409); the message
    names who holds what."""

    http_status = 409


def parse_gpu_request(spec) -> tuple[str, object]:
    """'2' or 2 → ('count', 2); '0,1' → ('ids', ['0', '1']); 'all' → ('all', None);
    None/'0'/0 → ('count', 0). Numbers in a list are positions in the session's GPUs."""
    if spec is None or spec == "":
        return ("count", 0)
    if isinstance(spec, bool):
        raise GPURequestError(f"gpus={spec!r}: give a count, a list like 0,1, or all")
    if isinstance(spec, int):
        if spec < 0:
            raise GPURequestError(f"gpus={spec}: must be 0 or more")
        return ("count", spec)
    if isinstance(spec, (list, tuple)):
        spec = ",".join(str(s) for s in spec)
    text = str(spec).strip()
    if text == "all":
        return ("all", None)
    if re.fullmatch(r"[0-9]{1,3}", text):
        return ("count", int(text))
    if re.fullmatch(r"[0-9]{1,3}(,[0-9]{1,3})+|[0-9]{1,3},", text):
        return ("ids", [t for t in text.split(",") if t])
    if re.fullmatch(r"(GPU|MIG)-[0-9A-Za-z/-]{1,80}(,(GPU|MIG)-[0-9A-Za-z/-]{1,80})*", text):
        return ("ids", text.split(","))
    raise GPURequestError(f"gpus={spec!r}: give a count (2), a list of the session's GPUs "
                          "(0,1) or all")



@dataclass(frozen=True)
class PhysicalGPU:
    visible_id: str  # as listed in CUDA_VISIBLE_DEVICES
    nvml_index: int
    uuid: str
    name: str
    pci_bus_id: str
    memory_total_mib: int


class NVMLUnavailable(RuntimeError):
    """NVML (nvidia-ml-py and the driver) cannot be used here."""


def map_visible_to_physical(visible: tuple[str, ...], devices: list[dict]) -> list[dict]:
    """Pure part of the mapping: ``devices`` are NVML's, in NVML index order, each a dict with
    ``index`` and ``uuid``. Integer ids are NVML indices; UUIDs (or their prefixes, as CUDA
    accepts) match a device's UUID. Raises ValueError naming an id that matches nothing."""
    by_index = {d["index"]: d for d in devices}
    out = []
    for vid in visible:
        if vid.isdigit():
            dev = by_index.get(int(vid))
        else:
            matches = [d for d in devices if d["uuid"].startswith(vid)]
            dev = matches[0] if len(matches) == 1 else None
        if dev is None:
            known = ", ".join(f"{d['index']}={d['uuid']}" for d in devices) or "none"
            raise ValueError(f"visible GPU {vid!r} matches no device NVML reports ({known})")
        out.append(dev)
    return out


def physical_gpus(visible: tuple[str, ...]) -> list[PhysicalGPU]:
    """Ask NVML about exactly the visible GPUs. Raises NVMLUnavailable without a driver."""
    try:
        import pynvml
    except ImportError as exc:
        raise NVMLUnavailable("nvidia-ml-py is not installed (pip install nvidia-ml-py)") from exc
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise NVMLUnavailable(f"NVML did not start: {exc} (no NVIDIA driver here?)") from exc
    try:
        devices = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            devices.append({
                "index": i,
                "uuid": _str(pynvml.nvmlDeviceGetUUID(h)),
                "name": _str(pynvml.nvmlDeviceGetName(h)),
                "pci": _str(pynvml.nvmlDeviceGetPciInfo(h).busId),
                "mem": pynvml.nvmlDeviceGetMemoryInfo(h).total // 2**20,
            })
        if not visible:  # nothing set: CUDA would see every device
            visible = tuple(str(d["index"]) for d in devices)
        return [
            PhysicalGPU(vid, d["index"], d["uuid"], d["name"], d["pci"], d["mem"])
            for vid, d in zip(visible, map_visible_to_physical(visible, devices), strict=True)
        ]
    finally:
        pynvml.nvmlShutdown()


def _str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
