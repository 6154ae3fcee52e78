"""The cell's display of a fine-tune run: a progress bar with the step, total and ETA, a live
loss curve, tokens/s, learning rate and GPU memory, and a Stop button. It follows the run's
metrics stream on disk, so it works the same when re-attached from a new kernel."""

from __future__ import annotations

import html
import threading
import time

import ipywidgets as w

from aifab.api import LIVE, Status
from aifab.magics.finetuning import FineTuneRun


def loss_svg(losses: list[float], width: int = 320, height: int = 90,
             max_points: int = 400) -> str:
    """An inline SVG polyline of the loss (pure: no plotting library needed), thinned to at
    most ``max_points`` so a long run's curve stays small."""
    if len(losses) < 2:
        return ""
    if len(losses) > max_points:
        stride = len(losses) / max_points
        losses = [losses[int(i * stride)] for i in range(max_points)] + [losses[-1]]
    lo, hi = min(losses), max(losses)
    span = (hi - lo) or 1.0
    pts = " ".join(
        f"{i * (width - 10) / (len(losses) - 1) + 5:.1f},"
        f"{height - 5 - (v - lo) / span * (height - 10):.1f}"
        for i, v in enumerate(losses))
    return (f'<svg width="{width}" height="{height}" style="border:1px solid #ddd">'
            f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{pts}"/>'
            f'<text x="6" y="12" font-size="10">{hi:.3f}</text>'
            f'<text x="6" y="{height - 6}" font-size="10">{lo:.3f}</text></svg>')


class FineTuneWidget(w.VBox):
    def __init__(self, run: FineTuneRun, poll: float = 1.0):
        self.run = run
        self.title = w.HTML(f"<b>fine-tune: {html.escape(run.name)}</b>")
        self.bar = w.IntProgress(min=0, max=1, value=0, layout=w.Layout(width="320px"))
        self.state = w.HTML("starting…")
        self.curve = w.HTML("")
        self.stats = w.HTML("")
        self.stop_button = w.Button(description="Stop", button_style="danger", icon="stop")
        self.stop_button.on_click(lambda _: self._stop())
        super().__init__([self.title, w.HBox([self.bar, self.state]), self.curve, self.stats,
                          self.stop_button])
        self.steps: list[dict] = []
        self.status = Status.STARTING
        self._poll = poll
        threading.Thread(target=self._watch, daemon=True).start()

    def update(self, metrics: list[dict], status: str, error: str = "") -> None:
        self.status = status
        self.steps = [m for m in metrics if m.get("event") == "step"]
        if self.steps:
            last = self.steps[-1]
            self.bar.max, self.bar.value = max(1, last["total"]), last["step"]
            first_t = self.steps[0]["time"]
            rate = (last["step"] - self.steps[0]["step"]) / max(last["time"] - first_t, 1e-9)
            eta = (last["total"] - last["step"]) / rate if rate > 0 else 0
            self.state.value = (f"step {last['step']}/{last['total']} · loss {last['loss']:.4f}"
                                + (f" · ETA {eta:.0f}s" if status == Status.STARTING else ""))
            self.curve.value = loss_svg([m["loss"] for m in self.steps])
            mem = ", ".join(f"{g:.1f}" for g in last.get("gpu_mem_gb") or [])
            where = f"GPU memory (GiB): {mem}" if mem else "on the CPU"
            self.stats.value = (f"{last['tokens_per_s']:.0f} tokens/s · lr {last['lr']:.2e}"
                                f" · {where}")
        if status == Status.STOPPING:
            self.state.value += " · stopping (saving a checkpoint)…"
        if status == Status.FINISHED:
            self.bar.bar_style = "success"
            done = next((m for m in metrics if m.get("event") == "done"), {})
            self.state.value += f" · done: {html.escape(done.get('output', ''))}"
            self.stop_button.disabled = True
        elif status in (Status.FAILED, Status.STOPPED):
            self.bar.bar_style = "danger"
            self.state.value += f" · {html.escape(status)} {html.escape(error)}"
            self.stop_button.disabled = True

    def _watch(self) -> None:
        failures = 0
        while True:
            try:
                info = self.run.info
                self.update(self.run.metrics(since_last_start=True), info["status"],
                            info.get("error", ""))
                failures = 0
            except Exception as exc:  # keep following: a hiccup must not end the display
                failures += 1
                self.state.value = f"cannot reach the session services: {html.escape(str(exc))}"
                if failures > 30:
                    return
                time.sleep(min(30, self._poll * 2 ** failures))
                continue
            if Status(info["status"]) not in LIVE:
                return
            time.sleep(self._poll)

    def _stop(self) -> None:
        self.stop_button.disabled = True
        self.run.stop()
