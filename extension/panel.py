"""What the JupyterLab panel (``labextension/``) needs beyond the records: the placement in
words, the browser's address of the session, and a fine-tune run's progress summarised from
its metrics stream. The kernel-side widgets read the stream from disk; the browser cannot, so
the server summarises it here. Pure functions (the handlers pass in what they read), except
``gpu_usage``, which asks NVML."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from aifab.gpus import map_visible_to_physical
from aifab.session import ENV_PUBLIC_URL, Session

# the most loss points a sparkline needs: a long run is thinned, its last point always kept
SPARK_POINTS = 120


def placement(session: Session, hostname: str) -> str:
    """Where the session runs, as the status bar says it: "this machine (host)", "Slurm job
    1234 on nid001", "pod jupyter-ada"."""
    if session.backend == "slurm":
        job = f"Slurm job {session.slurm_job_id}" if session.slurm_job_id else "Slurm"
        return f"{job} on {hostname}"
    if session.backend == "kubernetes":
        return f"pod {session.pod_name}" if session.pod_name else "Kubernetes pod"
    return f"this machine ({hostname})"


def public_url(env: Mapping[str, str]) -> str:
    """The session's address as a browser outside the cluster reaches it (through the hub),
    e.g. ``https://hub.example.org/user/ada/``; "" when the hub did not say (the panel then
    uses the address the browser itself is on). Never the server-internal URL."""
    url = env.get(ENV_PUBLIC_URL) or env.get("JUPYTERHUB_PUBLIC_URL") or ""
    return url.rstrip("/") + "/" if url else ""


def run_progress(lines: Iterable[str]) -> dict:
    """A fine-tune run's progress from its metrics stream (``metrics.jsonl``), this attempt
    only (after a ``--resume`` the stream holds earlier attempts too): step/total, the last
    loss, a thinned loss curve, the ETA from the step rate, the last complete checkpoint and
    the output of a finished run."""
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line being written
        if isinstance(record, dict):
            records.append(record)
    starts = [i for i, r in enumerate(records) if r.get("event") == "start"]
    if starts:
        records = records[starts[-1]:]
    steps = [r for r in records if r.get("event") == "step"
             and isinstance(r.get("step"), int) and isinstance(r.get("loss"), (int, float))]
    out: dict = {"step": 0, "total": 0, "loss": None, "losses": [], "eta_s": None,
                 "tokens_per_s": None, "checkpoint": "", "output": "", "interrupted": ""}
    if steps:
        first, last = steps[0], steps[-1]
        total = last.get("total") if isinstance(last.get("total"), int) else 0
        out.update(step=last["step"], total=total, loss=last["loss"],
                   tokens_per_s=last.get("tokens_per_s"),
                   losses=_thin([r["loss"] for r in steps], SPARK_POINTS))
        elapsed = float(last.get("time", 0)) - float(first.get("time", 0))
        rate = (last["step"] - first["step"]) / elapsed if elapsed > 0 else 0.0
        if rate > 0 and total:
            out["eta_s"] = round(max(0, total - last["step"]) / rate, 1)
    for r in records:
        if r.get("event") == "checkpoint":
            out["checkpoint"] = str(r.get("path", ""))
        elif r.get("event") == "done":
            out["output"] = str(r.get("output", ""))
            out["eta_s"] = 0
        elif r.get("event") == "interrupted":
            out["interrupted"] = str(r.get("reason", ""))
    return out


def _thin(values: list, n: int) -> list:
    if len(values) <= n:
        return list(values)
    stride = len(values) / n
    picked = [values[int(i * stride)] for i in range(n - 1)]
    return [*picked, values[-1]]


def gpu_usage(visible: tuple[str, ...]) -> tuple[list[dict], str]:
    """Memory and utilisation of the session's *visible* GPUs only (NVML lists the whole
    node; the ids are mapped as aifab.gpus maps them), and a note when NVML cannot say.
    Not pure: it asks the driver; a session without GPUs never does."""
    if not visible:
        return [], ""
    try:
        import pynvml
    except ImportError:
        return [], "memory and utilisation: nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return [], f"memory and utilisation: NVML did not start ({exc})"
    try:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i)
                   for i in range(pynvml.nvmlDeviceGetCount())]
        devices = [{"index": i, "uuid": _text(pynvml.nvmlDeviceGetUUID(h))}
                   for i, h in enumerate(handles)]
        out = []
        for vid, dev in zip(visible, map_visible_to_physical(visible, devices), strict=True):
            h = handles[dev["index"]]
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            out.append({"id": vid, "name": _text(pynvml.nvmlDeviceGetName(h)),
                        "memory_used_mib": mem.used // 2**20,
                        "memory_total_mib": mem.total // 2**20,
                        "utilization": pynvml.nvmlDeviceGetUtilizationRates(h).gpu})
        return out, ""
    except (pynvml.NVMLError, ValueError) as exc:
        return [], f"memory and utilisation: {exc}"
    finally:
        pynvml.nvmlShutdown()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
