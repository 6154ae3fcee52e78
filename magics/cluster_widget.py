"""The display of an ``aifab.cluster()`` in the notebook.

Workers requested / pending (with Slurm's reason) / running, a scale control, adaptive
scaling between a minimum and a maximum (in whole jobs when a job runs several worker
processes), the threads and memory of the connected workers, and the dashboard's link through
the Jupyter server's proxy. A background thread refreshes it every second.
"""

from __future__ import annotations

import html
import threading
import time
from collections import Counter

import ipywidgets as w
from dask.utils import format_bytes

from aifab.magics.dask_cluster import dashboard_url, resources_in_use


class ClusterWidget(w.VBox):
    def __init__(self, cluster, poll: float = 1.0):
        self.cluster = cluster
        self.title = w.HTML(f"<b>dask: {html.escape(type(cluster).__name__)}</b>")
        self.counts = w.HTML("")
        self.resources = w.HTML("")
        self.dashboard = w.HTML("")
        narrow = w.Layout(width="180px")
        self.scale_input = w.BoundedIntText(value=cluster.requested_workers, min=0, max=10_000,
                                            description="Workers", layout=narrow)
        self.scale_button = w.Button(description="Scale", icon="arrows-v")
        self.adapt_min = w.BoundedIntText(value=0, min=0, max=10_000, description="Minimum",
                                          layout=narrow)
        self.adapt_max = w.BoundedIntText(value=max(4, cluster.processes_per_job), min=0,
                                          max=10_000, description="Maximum", layout=narrow)
        self.adapt_button = w.Button(description="Adapt", icon="refresh")
        self.message = w.HTML("")
        self.scale_button.on_click(lambda _: self.scale(self.scale_input.value))
        self.adapt_button.on_click(lambda _: self.adapt(self.adapt_min.value,
                                                        self.adapt_max.value))
        super().__init__([
            self.title, self.counts, self.resources, self.dashboard,
            w.HBox([self.scale_input, self.scale_button]),
            w.HBox([self.adapt_min, self.adapt_max, self.adapt_button]),
            self.message,
        ])
        # what the display shows, also readable from Python (and by the tests)
        self.requested = self.pending = self.running = 0
        self.pending_reasons: dict[str, int] = {}
        self._states: dict[str, tuple[str, str]] = {}
        self._last_squeue = 0.0
        self._poll = poll
        self._stop = threading.Event()
        self.refresh()
        self._thread = threading.Thread(target=self._watch, daemon=True,
                                        name="aifab-cluster-widget")
        self._thread.start()

    # ------------------------------------------------------------------ controls
    def scale(self, n: int) -> None:
        """Ask for ``n`` workers (whole jobs: rounded up to the processes per job)."""
        adaptive = getattr(self.cluster, "_adaptive", None)
        if adaptive is not None:  # a fixed size replaces adaptive scaling (as in dask's widget)
            adaptive.stop()
        self.cluster.scale(n)
        p = self.cluster.processes_per_job
        rounded = -(-n // p) * p
        note = f" ({rounded} workers: {p} per job)" if rounded != n else ""
        self.message.value = f"scaling to {n} workers{note}"
        self.refresh(force=True)

    def adapt(self, minimum: int, maximum: int) -> None:
        if maximum < minimum:
            self.message.value = (f"<span style='color:#b00'>maximum ({maximum}) is below "
                                  f"minimum ({minimum})</span>")
            return
        adaptive = self.cluster.adapt(minimum=minimum, maximum=maximum)
        self.message.value = (f"adapting between {adaptive.minimum} and {adaptive.maximum} "
                              f"workers" + (f" ({self.cluster.processes_per_job} per job)"
                                            if self.cluster.processes_per_job > 1 else ""))
        self.refresh()

    # ------------------------------------------------------------------ display
    def refresh(self, force: bool = False) -> None:
        cluster = self.cluster
        p = cluster.processes_per_job
        running = len(cluster.scheduler_info.get("workers", {}))
        # Slurm is asked only while something waits (or every 30 s): with a class of 50,
        # a squeue per second per notebook would load the controller for nothing
        now = time.monotonic()
        waiting = cluster.requested_workers > running or self.pending
        if force or waiting or now - self._last_squeue > 30:
            self._states, self._last_squeue = cluster.job_states(), now
        states = self._states
        pending_jobs = [reason for state, reason in states.values() if state == "PENDING"]
        self.requested = cluster.requested_workers
        self.running = running
        self.pending = len(pending_jobs) * p
        self.pending_reasons = dict(Counter(pending_jobs))
        why = ", ".join(f"{html.escape(r)}" + (f" ×{n}" if n > 1 else "")
                        for r, n in self.pending_reasons.items())
        self.counts.value = (
            f"workers: requested <b>{self.requested}</b> · pending <b>{self.pending}</b>"
            + (f" ({why})" if why else "") + f" · running <b>{running}</b>")
        threads, memory = resources_in_use(cluster)
        self.resources.value = f"in use: {threads} threads, {format_bytes(memory)} memory"
        url = dashboard_url(cluster)
        if url:
            self.dashboard.value = (f"dashboard: <a href='{html.escape(url)}' target='_blank'>"
                                    f"{html.escape(url)}</a>")

    def _watch(self) -> None:
        while not self._stop.wait(self._poll):
            if getattr(self.cluster, "status", None) is not None \
                    and self.cluster.status.name in ("closing", "closed"):
                self.show_closed()
                return
            try:
                self.refresh()
            except Exception as exc:  # squeue unreachable for a moment: say so, keep going
                self.message.value = f"cannot refresh: {html.escape(str(exc))}"

    def show_closed(self) -> None:
        """A closed cluster says so: no threads, memory or dashboard left, no live controls."""
        self._stop.set()
        self.requested = self.pending = self.running = 0
        self.pending_reasons = {}
        self.counts.value = "cluster closed: its workers are gone"
        self.resources.value = self.dashboard.value = self.message.value = ""
        for control in (self.scale_input, self.scale_button, self.adapt_min, self.adapt_max,
                        self.adapt_button):
            control.disabled = True

    def close(self) -> None:
        self._stop.set()
        super().close()
