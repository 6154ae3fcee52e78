"""``aifab.finetune(...)``: LoRA or full fine-tuning on the session's GPUs, as a run owned by
the session services (it outlives the kernel; any notebook can attach to it by name).

The options are checked by the server (``aifab.extension.kinds.finetune``), which builds the
trainer's command line: a refusal here is the server's message, the same for every client.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from aifab.api import FineTuneOptions, Status

from .client import ServiceHandle, ServiceRequestError, SessionClient, kernel_path

__all__ = ["FineTuneError", "FineTuneOptions", "FineTuneRun", "attach", "finetune"]



class FineTuneError(ValueError):
    """A fine-tune request refused before any process starts (the server's message)."""



def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError:
        return []


class FineTuneRun(ServiceHandle):
    """A handle on a run: its status and metrics, whichever kernel started it."""

    @property
    def output(self) -> str:
        return self.info["output"]

    def metrics(self, since_last_start: bool = False) -> list[dict]:
        lines = _lines(Path(self.output, "metrics.jsonl"))
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line being written
        if since_last_start:  # this attempt only (after a --resume)
            starts = [i for i, m in enumerate(out) if m.get("event") == "start"]
            out = out[starts[-1]:] if starts else out
        return out

    def __repr__(self) -> str:
        # a run is "starting" to the services until it ends; say what a user sees instead
        status = self.status
        steps = [m for m in self.metrics(since_last_start=True) if m.get("event") == "step"]
        if steps and status == Status.STARTING:
            last = steps[-1]
            return f"<FineTuneRun {self.name!r} running: step {last['step']}/{last['total']}>"
        return f"<FineTuneRun {self.name!r} {status}>"

    def wait(self, timeout: float = 7 * 24 * 3600) -> FineTuneRun:
        self._client.wait(self.name, timeout, until=(Status.FINISHED,))
        return self

    def wait_served(self, timeout: float = 900):
        """With --serve: wait for the run to finish and its adapter to be served; returns the
        Served handle (its model name for the adapter is the run's name)."""
        deadline = time.monotonic() + timeout
        while getattr(self, "served", None) is None:
            if getattr(self, "serve_error", None):
                raise RuntimeError(self.serve_error)
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {self.name!r}: nothing served after {timeout:.0f}s")
            time.sleep(0.5)
        return self.served.wait_ready(max(1.0, deadline - time.monotonic()))


def finetune(model: str, data: str, serve: bool = False, **kw) -> FineTuneRun:
    """Start a fine-tune run (see %finetune). Bad input is refused before anything starts;
    with ``serve=True`` the result is served once the run has finished."""
    allowed = [f for f in FineTuneOptions.field_names() if f not in ("model", "data")]
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise FineTuneError(f"unknown option(s) {', '.join(unknown)}; allowed: "
                            f"{', '.join(allowed)}, serve")
    opts = FineTuneOptions(model=model, data=data, **kw)
    # data is a path (made absolute here, so a message names the kernel's folder); model may
    # also be a name in the shared cache or a Hugging Face id
    opts.model = kernel_path(opts.model)
    opts.data = os.path.abspath(os.path.expanduser(opts.data))
    if opts.output:
        opts.output = os.path.abspath(os.path.expanduser(opts.output))
    client = SessionClient()
    try:
        info = client.create(opts.to_request())
    except ServiceRequestError as exc:
        raise FineTuneError(str(exc)) from None
    run = FineTuneRun(info["name"], client)
    if serve:
        _serve_when_done(run)
    return run


def _serve_when_done(run: FineTuneRun) -> None:
    """serve=True: once the run has finished, serve what it wrote (in a thread, so the cell
    returns); ``run.wait_served()`` waits for it."""
    import threading

    def go():
        from .serving import serve

        try:
            run.wait()
            info, name = run.info, run.name[:36].rstrip("-") + "-srv"
            if Path(run.output, "adapter_config.json").is_file():
                run.served = serve(info["model"], name=name, loras={run.name: run.output})
            else:  # method full: the output is a model of its own
                run.served = serve(run.output, name=name)
        except Exception as exc:
            run.serve_error = f"serve after the run: nothing served: {exc}"

    threading.Thread(target=go, daemon=True).start()


def attach(name: str) -> FineTuneRun:
    """A run started by any kernel of this session, by name."""
    client = SessionClient()
    client.get(name)
    return FineTuneRun(name, client)
