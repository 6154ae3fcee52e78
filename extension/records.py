"""A session service's record: what the server knows of one service, kept on disk
(``STATE/NAME/record.json``, mode 0600, replaced atomically) so that a restarted Jupyter
server finds its services again."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from aifab.api import Status


@dataclass
class Service:
    name: str
    kind: str
    argv: list[str]
    gpus: list[str]
    port: int
    api_key: str
    dir: str
    status: Status = Status.STARTING
    phase: str = "starting"
    pid: int = 0
    started: float = 0.0  # the process's start time: tells our process from a reused pid
    model: str = ""
    served_name: str = ""
    socket: str = ""  # vLLM: its Unix socket (in a private 0700 runtime directory)
    output: str = ""  # a fine-tune run's output directory (its metrics stream is there)
    loras: dict[str, str] = field(default_factory=dict)  # adapter name -> directory
    # the checked request it was started with, for what may start it again (a run's Resume)
    request: dict = field(default_factory=dict)
    slurm_step: str = ""  # "JOB|STEP NAME" when it runs as a step of an allocation
    host: str = ""  # where it listens, when not on this machine's loopback (a node's address)
    tls: str = ""  # its TLS folder (the proxy's client certificate), for a service on a node
    # published to the hub's aifab-models gateway: {"id", "groups", "key"} (the key is what
    # the gateway sends to /aifab/published/NAME; never shown)
    published: dict = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    ready_at: float | None = None
    exit_code: int | None = None
    error: str = ""

    def __post_init__(self):
        self.status = Status(self.status)

    @property
    def log_path(self) -> Path:
        return Path(self.dir) / "service.log"

    def public(self) -> dict:
        """What the REST API shows: never the API key (nor the argv, which may hold paths
        and flags a user did not choose to share; its program is enough)."""
        d = asdict(self)
        d.pop("api_key")
        d["published"] = {k: v for k, v in self.published.items() if k != "key"}
        d["status"] = self.status.value
        d["argv"] = d["argv"][:1]
        d["uptime"] = round(time.time() - self.started_at, 1)
        return d

    def save(self) -> None:
        path = Path(self.dir) / "record.json"
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({**asdict(self), "status": self.status.value}, f)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Service:
        """Raises OSError, ValueError or TypeError for a record this version cannot read."""
        return cls(**json.loads(path.read_text()))


def tail(path: Path, n: int) -> list[str]:
    """The last ``n`` lines of a log (reading at most its last 256 KiB)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * 1024))
            return f.read().decode(errors="replace").splitlines()[-n:]
    except OSError:
        return []
