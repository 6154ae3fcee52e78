"""The session services' REST vocabulary, shared by the server and its clients: the lifecycle
of a service (``Status``), the errors a request can meet (each carries its HTTP status, so no
status is ever chosen by matching message text), and the typed fine-tune request.

Pure data: importing this module starts nothing and touches no file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum


class Status(str, Enum):
    """A service's lifecycle: starting → ready → (stopping →) stopped | finished | failed.
    A one-shot service (a fine-tune run) goes from starting straight to finished or failed."""

    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FINISHED = "finished"
    FAILED = "failed"
    STOPPED = "stopped"

    __str__ = str.__str__  # "ready", not "Status.READY", in messages and logs
    __format__ = str.__format__
    __hash__ = str.__hash__  # so that "ready" in {Status.READY, ...} holds, as == does

    @property
    def live(self) -> bool:
        """Still holding its process (and its GPUs)."""
        return self in LIVE

    @property
    def running(self) -> bool:
        """Starting or ready: what the watcher checks and the proxy forwards to."""
        return self in (Status.STARTING, Status.READY)


LIVE = frozenset({Status.STARTING, Status.READY, Status.STOPPING})
ENDED = frozenset({Status.FINISHED, Status.FAILED, Status.STOPPED})


class ApiError(Exception):
    """A request the session services cannot carry out; ``http_status`` is the answer."""

    http_status = 500


class BadRequest(ApiError, ValueError):
    """The request itself is wrong: the message names the field and what is allowed."""

    http_status = 400


class NotFound(ApiError, LookupError):
    http_status = 404


class Conflict(ApiError):
    """Right request, wrong moment: a name in use, GPUs held by another service."""

    http_status = 409


class Unavailable(ApiError):
    """The service exists but cannot answer now (stopped, failed, not started)."""

    http_status = 503


@dataclass
class FineTuneOptions:
    """A fine-tune request (``%finetune``, ``aifab.finetune()``, ``POST /aifab/api/services``
    with ``kind: finetune``): the one place the options and their defaults are defined. The
    server checks them (``aifab.extension.kinds.finetune``) and builds the trainer's command
    line itself."""

    model: str
    data: str
    name: str = ""
    method: str = "lora"
    epochs: float | None = None
    max_steps: int | None = None
    lr: float = 2e-4
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 512
    packing: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    gpus: int | str | None = None
    output: str = ""
    resume: bool = False
    save_steps: int = 50
    seed: int = 0
    on: str = ""  # an allocation the session holds: the run is a step in it
    nodes: int = 1  # of that allocation's nodes: one torchrun on each (the first N)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_request(cls, body: dict) -> FineTuneOptions:
        """The options from a request body (``kind`` dropped), with every number checked and
        converted (YAML and JSON clients send "2e-4" as a string). Raises BadRequest."""
        fields = {k: v for k, v in body.items() if k != "kind"}
        unknown = sorted(set(fields) - set(cls.field_names()))
        if unknown:
            raise BadRequest(f"unknown fine-tune option(s) {', '.join(unknown)}; allowed: "
                             f"{', '.join(cls.field_names())}")
        for required in ("model", "data"):
            if not isinstance(fields.get(required), str) or not fields[required].strip():
                raise BadRequest(f"{required}: required, a path or a name")
        opts = cls(**fields)
        for fname, kind in _NUMBERS:
            setattr(opts, fname, _number(fname, getattr(opts, fname), kind))
        for fname in ("packing", "resume"):
            if not isinstance(getattr(opts, fname), bool):
                raise BadRequest(f"{fname}={getattr(opts, fname)!r}: true or false")
        for fname in ("name", "method", "output", "on"):
            if not isinstance(getattr(opts, fname), str):
                raise BadRequest(f"{fname}={getattr(opts, fname)!r}: expected a string")
        return opts

    def to_request(self) -> dict:
        return {"kind": "finetune", **dataclasses.asdict(self)}


_NUMBERS = (("lr", float), ("epochs", float), ("max_steps", int), ("batch_size", int),
            ("grad_accum", int), ("seq_len", int), ("lora_r", int), ("lora_alpha", int),
            ("save_steps", int), ("seed", int), ("nodes", int))


def _number(fname: str, value, kind):
    if value is None or (isinstance(value, kind) and not isinstance(value, bool)):
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    try:
        if isinstance(value, bool):
            raise ValueError
        converted = kind(value)
        if kind is int and str(value).strip() != str(converted):
            raise ValueError
    except (TypeError, ValueError):
        what = "an integer" if kind is int else "a number"
        raise BadRequest(f"{fname}={value!r}: expected {what}") from None
    return converted
