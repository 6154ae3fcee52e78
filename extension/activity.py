"""Work a session does counts as activity, so an idle culler does not stop it mid-run.

JupyterHub (and jupyterhub-idle-culler) see a server's activity only through what the
single-user server reports: every ``JUPYTERHUB_ACTIVITY_INTERVAL`` seconds it posts
``ServerWebApplication.last_activity()``, the latest of the server's start, its kernels' and
API requests' activity, and every tornado setting whose key ends in ``_last_activity``. This
module owns one such key, ``aifab_last_activity``, and moves it forward when

* a fine-tune run is stepping: its process is live and its metrics stream
  (``OUTPUT/metrics.jsonl``, one line per step, checkpoint, ...) grew since the last look;
* a service answered a request through the session's proxy (the proxy calls ``touch()``).

A service that merely runs (an idle vLLM, a run whose process hangs) does not count: a session
nobody uses and that does no work is still culled. A culled session's runs are stopped with
the server: SIGTERM, on which the trainer saves a checkpoint before it exits (``--resume``
continues from it).
"""

from __future__ import annotations

import asyncio
import random
from datetime import datetime, timezone
from pathlib import Path

from aifab.api import Status

SETTINGS_KEY = "aifab_activity"  # the Activity object, for handlers (the proxy)
# jupyter_server's last_activity() counts every setting whose key ends in "_last_activity"
LAST_ACTIVITY_KEY = "aifab_last_activity"
METRICS = "metrics.jsonl"  # the trainer's metrics stream in a run's output directory


def _mark(path: Path) -> tuple[int, int] | None:
    """What changes when a file grows: (size, mtime in ns); None while it does not exist."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


class Activity:
    """The session's own activity, as one ``_last_activity`` setting of the Jupyter server.

    ``settings`` is the server's tornado settings (``serverapp.web_app.settings``, the dict
    ``last_activity()`` reads, not an extension's copy of it); ``manager`` has ``services``,
    a dict name -> record with ``kind``, ``status`` and ``output``.
    """

    def __init__(self, settings: dict, manager, log=None, interval: float = 5.0):
        self.settings = settings
        self.manager = manager
        self.log = log
        self.interval = interval
        self._seen: dict[str, tuple[str, tuple[int, int] | None]] = {}  # run -> (output, mark)
        self._task: asyncio.Task | None = None

    @property
    def last(self) -> datetime | None:
        return self.settings.get(LAST_ACTIVITY_KEY)

    def touch(self) -> None:
        """Something happened now (a timezone-aware UTC time, as jupyter_server's own)."""
        self.settings[LAST_ACTIVITY_KEY] = datetime.now(timezone.utc)

    def stepping_runs(self) -> list[str]:
        """The live fine-tune runs whose metrics stream changed since the last call.

        The first look at a run only notes where its stream is (a run seen for the first time
        may have stepped or not: its start was a request, which counted already)."""
        seen: dict[str, tuple[str, tuple[int, int] | None]] = {}
        stepping = []
        for name, svc in list(self.manager.services.items()):
            if svc.kind != "finetune" or not svc.output or not Status(svc.status).running:
                continue
            mark = _mark(Path(svc.output) / METRICS)
            seen[name] = (svc.output, mark)
            before = self._seen.get(name)
            if before is not None and before[0] == svc.output and before[1] != mark \
                    and mark is not None:
                stepping.append(name)
        self._seen = seen  # runs that ended are forgotten
        return stepping

    def check(self) -> bool:
        """One look at the runs; touch if one is stepping. Returns whether it touched."""
        stepping = self.stepping_runs()
        if stepping:
            self.touch()
            if self.log is not None:
                self.log.debug("aifab: activity: runs stepping: %s", ", ".join(stepping))
        return bool(stepping)

    # ------------------------------------------------------------ the periodic look
    def start(self) -> None:
        """Look every ``interval`` seconds (with jitter), on the running event loop."""
        if self._task is None or self._task.done():
            self.check()  # the baseline: what each run has written so far
            self._task = asyncio.get_running_loop().create_task(self._watch())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval * (0.9 + 0.2 * random.random()))
            try:
                self.check()
            except Exception:  # a bad record must not end the watch
                if self.log is not None:
                    self.log.exception("aifab: checking the runs' activity failed")


def install(extension_app, manager, interval: float = 5.0) -> Activity:
    """Create the session's Activity for an ExtensionApp (in its ``initialize_settings``): it
    goes to the settings as ``aifab_activity`` and writes the server's own settings. Call
    ``start()`` once the event loop runs, ``stop()`` when the extension stops."""
    activity = Activity(extension_app.serverapp.web_app.settings, manager,
                        log=extension_app.log, interval=interval)
    extension_app.settings[SETTINGS_KEY] = activity
    return activity
