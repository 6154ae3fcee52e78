"""Models by name from the site's shared, read-only model cache.

A profile's ``model_cache`` (a workshop's, say) gives the session ``AIFAB_MODEL_CACHE``: a
folder with one model per sub-folder (``/store/models/llama-3.1-8b-instruct``). Then
``%serve llama-3.1-8b-instruct`` and ``%finetune llama-3.1-8b-instruct data.jsonl`` find the
model there, and 50 participants read one copy instead of each downloading their own. The same
folder is also the Hugging Face cache (``HF_HUB_CACHE``, offline), for ``org/name`` spellings.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

from .session import ENV_MODEL_CACHE as ENV_CACHE


def cache_dir() -> Path | None:
    value = os.environ.get(ENV_CACHE, "").strip()
    return Path(value) if value else None


def resolve(model: str) -> str:
    """A model directory as given, else NAME in the shared cache, else ``model`` unchanged
    (a Hugging Face name, for the caller to check)."""
    path = Path(os.path.expanduser(model))
    if path.is_dir():
        return str(path.resolve())
    cache = cache_dir()
    if cache is not None and "/" not in model and model not in (".", ".."):
        candidate = cache / model
        if (candidate / "config.json").is_file():
            return str(candidate)
    return model


def cached_models() -> list[str]:
    """The models in the shared cache (sub-folders with a config.json)."""
    cache = cache_dir()
    if cache is None or not cache.is_dir():
        return []
    return sorted(p.name for p in cache.iterdir() if (p / "config.json").is_file())


def offline_refusal(model_id: str, env=None) -> str:
    """Why a Hugging Face id cannot be used in an offline session ("" when it can): offline
    (HF_HUB_OFFLINE=1, a workshop's profile sets it) a model must already be in the cache,
    else Hugging Face fails deep in the start-up with advice a notebook user cannot act on."""
    env = os.environ if env is None else env
    if env.get("HF_HUB_OFFLINE", "").strip().lower() not in ("1", "true", "yes", "on"):
        return ""
    hub = env.get("HF_HUB_CACHE") or os.path.join(
        env.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface"), "hub")
    if (Path(hub) / ("models--" + model_id.replace("/", "--"))).is_dir():
        return ""
    cached = ", ".join(cached_models()) or "no models"
    return (f"model {model_id!r}: offline session, and it is not in the shared model cache "
            f"(it has: {cached})")


class _CallableModule(types.ModuleType):
    """``aifab.models()``: this module, called, lists the published models the caller may use
    through the hub's gateway (``aifab.published.models``). The name is the one users know
    from OpenAI's ``client.models.list()``; the module keeps its functions."""

    def __call__(self, token: str | None = None) -> list[dict]:
        from .published import models

        return models(token)


sys.modules[__name__].__class__ = _CallableModule
