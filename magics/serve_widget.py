"""The cell's display of a served model: start-up phases with elapsed time while it starts,
then the model, its GPUs and URLs, with Stop and Logs buttons. A background thread polls
the session services, so the widget also works for a server started elsewhere."""

from __future__ import annotations

import html
import threading
import time

import ipywidgets as w

from aifab.api import LIVE, Status
from aifab.magics.client import ServiceRequestError
from aifab.magics.serving import Served

PHASES = ["starting", "loading weights", "compiling", "KV cache", "starting server",
          "first request", "ready"]


class ServeWidget(w.VBox):
    def __init__(self, served: Served, poll: float = 1.0):
        self.served = served
        self.title = w.HTML(f"<b>vLLM: {html.escape(served.name)}</b>")
        self.state = w.HTML("starting…")
        self.progress = w.IntProgress(min=0, max=len(PHASES) - 1, value=0,
                                      layout=w.Layout(width="320px"))
        self.details = w.HTML("")
        self.stop_button = w.Button(description="Stop", button_style="danger",
                                    icon="stop")
        self.logs_button = w.Button(description="Logs", icon="file-text")
        self.log_view = w.Output(layout=w.Layout(max_height="240px", overflow="auto"))
        self.stop_button.on_click(lambda _: self._stop())
        self.logs_button.on_click(lambda _: self._show_logs())
        super().__init__([self.title, w.HBox([self.progress, self.state]), self.details,
                          w.HBox([self.stop_button, self.logs_button]), self.log_view])
        self.status = Status.STARTING
        self.phase = "starting"
        self._t0 = time.monotonic()
        self._poll = poll
        self._ready_poll = max(poll, 2.0)
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ updates
    def update(self, info: dict) -> None:
        self.status, self.phase = info["status"], info["phase"]
        if self.phase in PHASES:
            self.progress.value = PHASES.index(self.phase)
        elapsed = time.monotonic() - self._t0
        if self.status == Status.STARTING:
            self.state.value = f"{html.escape(self.phase)} … {elapsed:.0f}s"
        elif self.status == Status.STOPPING:
            self.state.value = "stopping…"
        elif self.status == Status.READY:
            self.progress.bar_style = "success"
            self.state.value = f"ready after {info['ready_at'] - info['started_at']:.0f}s"
            where = f"on GPUs {','.join(info['gpus'])}" if info["gpus"] else "on the CPU"
            public = (f"<br>browser / curl: <code>{html.escape(self.served.public_url)}</code>"
                      if self.served.public_url else "")
            loras = info.get("loras") or {}
            adapters = ("<br>adapters (call them by name): " + ", ".join(
                f"<code>{html.escape(n)}</code>" for n in loras)) if loras else ""
            self.details.value = (
                f"model <code>{html.escape(info['served_name'])}</code> "
                f"({html.escape(info['model'])}) {html.escape(where)}<br>"
                f"base_url: <code>{html.escape(self.served.base_url)}</code>{public}"
                f"{adapters}")
        else:  # ended: stopped (by anyone), failed, finished
            self.progress.bar_style = "danger" if self.status == Status.FAILED else ""
            error = f": {info['error']}" if info.get("error") else ""
            self.state.value = html.escape(f"{self.status}{error}")
            self.stop_button.disabled = True
            if self.status == Status.FAILED:
                self._show_logs(20)

    def _watch(self) -> None:
        """Follow the service until it ends (a stop from anywhere, a crash), not only until it
        is ready: the display must never show a live Stop button for a server that is gone.
        Once ready, a slower look is enough."""
        failures = 0
        while True:
            try:
                info = self.served.info
                failures = 0
            except (ServiceRequestError, OSError) as exc:
                failures += 1
                self.state.value = f"cannot reach the session services: {html.escape(str(exc))}"
                if failures > 10:
                    return
                time.sleep(min(30, self._poll * 2 ** failures))
                continue
            self.update(info)
            if Status(info["status"]) not in LIVE:
                return
            time.sleep(self._poll if info["status"] != Status.READY else self._ready_poll)

    # ------------------------------------------------------------ buttons
    def _stop(self) -> None:
        self.stop_button.disabled = True
        self.update(self.served.stop())

    def _show_logs(self, n: int = 50) -> None:
        self.log_view.clear_output()
        with self.log_view:
            print("\n".join(self.served.logs(n)))
