"""The ``aifab-models`` hub service: one OpenAI-compatible URL, ``/services/aifab-models/v1``,
for every model a user published, behind JupyterHub's identity and roles, with per-caller
limits, a usage log and vLLM's own router (``vllm-router``) in front of the replicas.

Only ``hub_config`` is imported here: a hub config calls ``add_models_service(c, ...)``; the
service itself runs as ``python -m aifab.gateway``.
"""

from .hub_config import SCOPE_PUBLISH, SCOPE_USE, add_models_service

__all__ = ["add_models_service", "SCOPE_USE", "SCOPE_PUBLISH"]
