"""GPU pinning on a real GPU machine: the ledger hands out the session's GPUs, NVML maps the
visible ids to physical GPUs, and torch in each service sees exactly the GPUs it was given.

    python -m benchmarks.gpu_pinning          # on a machine with NVIDIA GPUs (an H100)

Needs torch with CUDA and nvidia-ml-py; no Jupyter server (the session services' manager is
driven directly). Last line: {"bench": "gpu_pinning", ...}; without a GPU it says so.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from aifab.api import ApiError
from aifab.extension.kinds import LaunchPlan, ServiceKind
from aifab.extension.kinds.base import base_env
from aifab.extension.records import tail
from aifab.extension.services import ServiceManager
from aifab.gpus import NVMLUnavailable, physical_gpus
from aifab.session import Session

PROBE = ("import json, torch; print('SEEN ' + json.dumps([str(torch.cuda.get_device_properties(i)"
         ".uuid) for i in range(torch.cuda.device_count())]))")


class TorchProbeKind(ServiceKind):
    """A one-shot service that prints the UUIDs of the GPUs torch sees in it."""

    name = "torch-probe"
    one_shot = True

    def validate(self, spec):
        self.check_fields(spec)
        return spec

    def default_gpus(self, request):
        return request.get("gpus")

    def plan(self, request, *, name, gpus, service_dir, api_key):
        return LaunchPlan(argv=[sys.executable, "-c", PROBE], env=base_env(os.environ, gpus))


async def run() -> dict:
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
    except Exception as exc:  # no driver, no library: nothing to measure here
        return {"bench": "gpu_pinning", "skipped": f"no NVIDIA GPU usable here ({exc})"}
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", ",".join(str(i) for i in range(count)))
    session = Session.from_env()
    try:
        mapping = physical_gpus(session.visible_gpus)
    except NVMLUnavailable as exc:
        return {"bench": "gpu_pinning", "skipped": str(exc)}
    uuid_of = {g.visible_id: g.uuid.removeprefix("GPU-") for g in mapping}
    manager = ServiceManager(Path(tempfile.mkdtemp(prefix="aifab-pin-")), session,
                             logging.getLogger("gpu_pinning"),
                             kinds={"torch-probe": TorchProbeKind})
    manager.start_monitor()
    per = 2 if len(session.visible_gpus) >= 4 else 1
    services, t0 = [], time.perf_counter()
    for i in range(len(session.visible_gpus) // per):
        services.append(manager.create({"kind": "torch-probe", "name": f"pin-{i}",
                                        "gpus": per}))
    try:
        manager.create({"kind": "torch-probe", "name": "one-too-many", "gpus": 1})
        refusal = "NOT REFUSED"
    except ApiError as exc:
        refusal = str(exc)
    while any(s.status in ("starting", "ready") for s in services):
        await asyncio.sleep(0.2)
    ledger_s = time.perf_counter() - t0
    results = []
    for s in services:
        seen = next((json.loads(line[5:]) for line in tail(s.log_path, 50)
                     if line.startswith("SEEN ")), None)
        results.append({"service": s.name, "pinned": s.gpus,
                        "expected_uuids": [uuid_of[g] for g in s.gpus], "torch_uuids": seen,
                        "ok": seen == [uuid_of[g] for g in s.gpus]})
    await manager.shutdown()
    return {"bench": "gpu_pinning", "gpus": len(session.visible_gpus),
            "nvml": [{"visible": g.visible_id, "index": g.nvml_index, "name": g.name,
                      "uuid": g.uuid, "pci": g.pci_bus_id} for g in mapping],
            "services": results, "all_pinned_correctly": all(r["ok"] for r in results),
            "over_request_refused": refusal, "seconds": round(ledger_s, 2)}


def main() -> int:
    print(json.dumps(asyncio.run(run())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
