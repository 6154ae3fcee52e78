"""What every service kind is: validate a request (typed, on the server), build its launch
plan (the server builds every command line itself), say when it is ready, read its outcome.

A kind is one small class. ``ServiceManager`` owns the records, the GPU ledger and the
process trees; a kind knows only its own program.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aifab.api import BadRequest, Status
from aifab.session import Session

from .. import steps
from ..records import Service

# a launcher's ranks must never leak into a service started from a rank's environment
RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
COMMON_FIELDS = ("kind", "name", "gpus")


@dataclass
class KindContext:
    """What a kind may know of the session it serves."""

    session: Session
    state_dir: Path
    python: str = sys.executable
    environ: Mapping[str, str] = field(default_factory=dict)
    allocations: object = None  # the session's AllocationManager, for work --on one


@dataclass
class LaunchPlan:
    argv: list[str]
    env: dict[str, str]
    model: str = ""
    served_name: str = ""
    socket: str = ""
    port: int = 0
    output: str = ""
    loras: dict[str, str] = field(default_factory=dict)
    request: dict = field(default_factory=dict)  # kept in the record (see Service.request)
    slurm_step: str = ""  # "JOB|STEP NAME" of a service run as a step of an allocation
    tls: str = ""  # the folder of its TLS files, for a service reached over the network
    host: str = ""  # where such a service listens (its node's address; the port comes later)
    # undoes what building the plan made outside the service's folder (a runtime directory)
    discard: Callable[[], None] = lambda: None


class ServiceKind:
    name = ""
    # runs until its work is done (no readiness, no ready timeout); signals such as Slurm's
    # walltime warning are passed on to it
    one_shot = False
    # the request's own fields, besides kind, name and gpus
    fields: tuple[str, ...] = ()
    # validation reads files or runs programs: the server runs it off its event loop
    slow_validation = False
    # for a kind whose requests may go ``on`` an allocation (a field ``on``) but run on one
    # node only: why an allocation of several nodes is refused ("" = any allocation)
    one_node_only = ""

    def __init__(self, ctx: KindContext):
        self.ctx = ctx

    def is_slow(self, spec: Mapping) -> bool:
        """Whether validating ``spec`` must run off the event loop."""
        return self.slow_validation

    # ---------------------------------------------------------------- the request
    def check_fields(self, spec: Mapping) -> None:
        allowed = COMMON_FIELDS + self.fields
        unknown = sorted(k for k in spec if k not in allowed)
        if unknown:
            raise BadRequest(f"{', '.join(map(repr, unknown))}: not a field of a {self.name} "
                             f"service; allowed: {', '.join(allowed)}")

    def validate(self, spec: Mapping):
        """The typed request, checked. Raises BadRequest naming the field."""
        raise NotImplementedError

    def allocation(self, name: str):
        """The session's running allocation a request goes ``on``. Raises BadRequest."""
        return steps.running_allocation(self.ctx.allocations, name,
                                        one_node=self.one_node_only)

    def gpu_pool(self, request) -> tuple[str, ...]:
        """The GPUs the ledger hands this request's out of: the session's own, unless the
        request runs in one of the session's allocations (then that allocation's)."""
        on = getattr(request, "on", "")
        return steps.allocation_gpus(self.allocation(on)) if on else \
            self.ctx.session.visible_gpus

    def default_gpus(self, request) -> object:
        """What ``gpus`` means when the request leaves it out: one of its pool's, if any."""
        gpus = getattr(request, "gpus", None)
        return gpus if gpus is not None else (1 if self.gpu_pool(request) else 0)

    def plan(self, request, *, name: str, gpus: list[str], service_dir: Path,
             api_key: str) -> LaunchPlan:
        raise NotImplementedError

    # ---------------------------------------------------------------- the running service
    def phase(self, svc: Service) -> str:
        return svc.phase

    async def ready(self, svc: Service) -> bool:
        """Whether a starting service now serves (never called for one-shot kinds)."""
        return True

    def outcome(self, svc: Service) -> tuple[Status, str] | None:
        """(status, error) from what the service wrote, for an exit code that cannot tell
        (or for a service that ended while no server watched); None when it says nothing."""
        return None

    def ended(self, svc: Service) -> None:
        """Clean up what the service used outside its folder."""

    def stop_signal(self, svc: Service) -> signal.Signals:
        """What asks the service to stop (SIGKILL follows after the grace period)."""
        return signal.SIGTERM

    def resume_request(self, svc: Service) -> dict:
        """The request that continues an ended service where it stopped (a run from its last
        checkpoint). Raises BadRequest when this kind (or this service) cannot continue."""
        raise BadRequest(f"{svc.name!r} is a {svc.kind} service: only fine-tune runs resume; "
                         "start it again instead")


def base_env(environ: Mapping[str, str], gpus: Iterable[str]) -> dict[str, str]:
    env = {k: v for k, v in environ.items() if k not in RANK_VARS}
    env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    env["PYTHONUNBUFFERED"] = "1"
    return env
