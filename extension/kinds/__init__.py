"""Service kinds: each one small class (see ``base.ServiceKind``). The server runs only the
programs its kinds build; a site adds a kind through ``AifabExtension.extra_service_kinds``
(server configuration, never a request)."""

from __future__ import annotations

from .base import KindContext, LaunchPlan, ServiceKind

BUILTIN = {
    "vllm": "aifab.extension.kinds.vllm:VllmKind",
    "finetune": "aifab.extension.kinds.finetune:FineTuneKind",
}

__all__ = ["BUILTIN", "KindContext", "LaunchPlan", "ServiceKind", "load_kind"]


def load_kind(spec: str) -> type[ServiceKind]:
    """'package.module:Class' -> the class (a ServiceKind)."""
    import importlib

    module, _, attr = spec.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, ServiceKind)):
        raise TypeError(f"{spec}: not a ServiceKind")
    return cls
