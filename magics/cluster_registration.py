"""A kernel's dask cluster made known to its Jupyter server, for the JupyterLab panel (see
:mod:`aifab.extension.dask_panel`): registered when it is made, updated when it is scaled
(``adapt`` scales too), dropped when it is closed.

This is a courtesy to the panel, never a condition of the cluster: without a server (plain
IPython), or when the server does not answer, the cluster works the same and nothing is
raised. The requests go from a thread of their own, one at a time and latest first, so that
``scale()`` on the cluster's event loop never waits on HTTP.
"""

from __future__ import annotations

import logging
import threading
import uuid

from aifab.extension import dask_jobs

log = logging.getLogger(__name__)


class Registration:
    def __init__(self, cluster, backend: str):
        self.cluster = cluster
        self.backend = backend
        self.id = uuid.uuid4().hex[:16]
        self._client = None
        self._wanted = None  # the latest state to send: "put", "delete" or None (sent)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    def update(self) -> None:
        if not self._closed:
            self._send("put")

    def close(self) -> None:
        self._closed = True
        self._send("delete")

    def _send(self, what: str) -> None:
        with self._lock:
            self._wanted = what
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._drain, daemon=True,
                                                name="aifab-cluster-registration")
                self._thread.start()

    def flush(self, timeout: float = 10) -> None:
        """Wait until what was asked last has been sent (the tests, and close at exit)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _drain(self) -> None:
        while True:
            with self._lock:
                what, self._wanted = self._wanted, None
                if what is None:
                    self._thread = None
                    return
            try:
                self._request(what)
            except Exception as exc:  # the panel's loss, never the notebook's
                log.debug("aifab: the cluster's registration with the server failed: %s", exc)

    def _request(self, what: str) -> None:
        if self._client is None:
            from .client import SessionClient

            self._client = SessionClient()  # raises without a server: nothing to tell
        path = f"aifab/api/dask/{self.id}"
        if what == "delete":
            self._client.request("DELETE", path, timeout=5)
            return
        self._client.request("PUT", path, json=self.body(), timeout=5)

    def body(self) -> dict:
        kernel = dask_jobs.KernelRef.this_process()
        port = self.cluster.scheduler_info.get("services", {}).get("dashboard")
        kind = type(self.cluster).__name__.removeprefix("Session")  # LocalCluster, ...
        return {"name": f"{kind} {getattr(self.cluster, 'name', '')}"[:200],
                "backend": self.backend,
                "requested": int(self.cluster.requested_workers),
                "processes_per_job": int(self.cluster.processes_per_job),
                "dashboard_port": port if isinstance(port, int) else None,
                "kernel": {"host": kernel.host, "pid": kernel.pid, "start": kernel.start}}
