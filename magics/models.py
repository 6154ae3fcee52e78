"""The participant's side of published models: ``aifab.models()`` lists what this user may
call through the hub's ``aifab-models`` gateway; ``aifab.client()`` is an OpenAI client on it,
with the session's own hub token (the kernel has it: ``$JUPYTERHUB_API_TOKEN``)."""

from __future__ import annotations

import os

import requests

from aifab.hub_urls import models_url


def _token(token: str | None) -> str:
    token = token or os.environ.get("JUPYTERHUB_API_TOKEN", "")
    if not token:
        raise RuntimeError("no hub token: run this in a session started by the hub, or pass "
                           "token= (a token from the hub's Token page)")
    return token


def models(token: str | None = None) -> list[dict]:
    """The published models this user may use: ``[{"id": "OWNER/NAME", "owned_by", ...}]``."""
    r = requests.get(models_url() + "v1/models", timeout=30,
                     headers={"Authorization": f"Bearer {_token(token)}"})
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text
        raise RuntimeError(f"the models gateway says ({r.status_code}): {message}")
    return r.json()["data"]


def client(token: str | None = None, **kwargs):
    """An ``openai.OpenAI`` client on the gateway: ``client().chat.completions.create(
    model="OWNER/NAME", messages=[...])``."""
    from openai import OpenAI

    return OpenAI(base_url=models_url() + "v1", api_key=_token(token), **kwargs)
