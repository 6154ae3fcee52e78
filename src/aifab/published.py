"""A small client of the hub's ``aifab-models`` gateway (``aifab.gateway``), for kernels and
scripts: ``models()`` (what ``aifab.models()`` calls) lists what this user may call;
``client()`` (``aifab.client()``) is an OpenAI client on the gateway; ``deploy``,
``deployments``, ``undeploy`` and ``deployment_logs`` manage one's deployments. All of it with
the session's own hub token (the kernel has it: ``$JUPYTERHUB_API_TOKEN``) or ``token=``.

It lives in the root package, not with the magics, because ``aifab.models`` is also the
model-cache module: called, that module lists the published models (see its end)."""

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
    return _gateway("GET", "v1/models", token, timeout=30)["data"]


def client(token: str | None = None, **kwargs):
    """An ``openai.OpenAI`` client on the gateway: ``client().chat.completions.create(
    model="OWNER/NAME", messages=[...])``."""
    from openai import OpenAI

    return OpenAI(base_url=models_url() + "v1", api_key=_token(token), **kwargs)


def _gateway(method: str, path: str, token: str | None = None, **kw):
    r = requests.request(method, models_url() + path, timeout=kw.pop("timeout", 60),
                         headers={"Authorization": f"Bearer {_token(token)}"}, **kw)
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text
        raise RuntimeError(f"the models gateway says ({r.status_code}): {message}")
    return r.json() if r.content else None


def deploy(model: str, name: str, *, until: str, groups, replicas: int = 1, gpus: int = 0,
           max_model_len: int | None = None, token: str | None = None) -> dict:
    """Deploy ``model`` (a folder the nodes see) as ``name``: ``replicas`` Slurm jobs that
    the hub's gateway keeps running until ``until`` (an ISO time), for ``groups``, whether
    or not this session still runs. Called as ``OWNER/NAME`` like any published model."""
    expanded = os.path.expanduser(model)  # a folder relative to the kernel, made absolute
    body = {"name": name, "model": os.path.abspath(expanded) if os.path.exists(expanded)
            else model, "until": until, "groups": list(groups),
            "replicas": replicas, "gpus": gpus}
    if max_model_len:
        body["max_model_len"] = max_model_len
    return _gateway("POST", "api/deployments", token, json=body)


def deployments(token: str | None = None) -> list[dict]:
    """Your deployments, with their replicas' jobs, state and health."""
    return _gateway("GET", "api/deployments", token)["deployments"]


def undeploy(name: str, token: str | None = None) -> None:
    """End a deployment: its replica jobs are cancelled and it is withdrawn."""
    owner = os.environ.get("JUPYTERHUB_USER", "")
    if not owner:
        raise RuntimeError("undeploy needs to know your hub user name ($JUPYTERHUB_USER)")
    _gateway("DELETE", f"api/deployments/{owner}/{name}", token)


def deployment_logs(name: str, job: str, n: int = 100, token: str | None = None) -> dict:
    """The last ``n`` lines of one replica's logs (``{"replica": [...], "vllm": [...]}``)."""
    owner = os.environ.get("JUPYTERHUB_USER", "")
    return _gateway("GET", f"api/deployments/{owner}/{name}/logs", token,
                    params={"job": job, "n": n})
