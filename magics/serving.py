"""``aifab.serve(...)``: a vLLM OpenAI-compatible server on the session's GPUs, owned by the
session (it outlives the kernel), reached through Jupyter's authenticated proxy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .client import ServiceHandle, SessionClient, kernel_path


class Served(ServiceHandle):
    """A handle on a served model. ``base_url``/``api_key`` work with any OpenAI client in
    this session; ``public_url`` is the same endpoint through the hub, for the browser or
    curl with a JupyterHub token."""

    def __init__(self, name: str, client: SessionClient | None = None):
        super().__init__(name, client)
        self.base_url = self._client.proxy_url(name) + "v1"
        self.api_key = self._client.server.token  # Jupyter's token: the proxy adds vLLM's key
        public = self._client.server.public_url
        self.public_url = (public.rstrip("/") + f"/aifab/proxy/{name}/v1") if public else ""

    @property
    def model(self) -> str:
        return self.info["served_name"]

    def wait_ready(self, timeout: float = 600) -> Served:
        self._client.wait(self.name, timeout)
        return self

    def publish(self, groups: Sequence[str]) -> dict:
        """Publish this model to the hub's models gateway for ``groups`` (hub groups whom a
        hub role lets use your models): they call it as ``OWNER/NAME`` with
        ``aifab.client()``. It lives as long as this session's service."""
        record = self._client.request("POST", f"aifab/api/services/{self.name}/publish",
                                      json={"groups": list(groups)})
        self.published = record
        return record

    def unpublish(self) -> None:
        """Take it off the gateway (it keeps serving this session)."""
        self._client.request("DELETE", f"aifab/api/services/{self.name}/publish")
        self.published = None

    def client(self):
        """An ``openai.OpenAI`` client for this server."""
        from openai import OpenAI

        return OpenAI(base_url=self.base_url, api_key=self.api_key)

    def __repr__(self) -> str:
        return f"<Served {self.name!r} {self.status} at {self.base_url}>"


def serve(
    model: str,
    name: str | None = None,
    gpus: int | str | None = None,
    tensor_parallel: int | str = "auto",
    max_model_len: int | None = None,
    gpu_memory_utilization: float | None = None,
    loras: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    wait: bool = False,
    timeout: float = 900,
    on: str | None = None,
    share: Sequence[str] = (),
) -> Served:
    """Start vLLM on ``gpus`` of this session's GPUs (None: CPU if the session has none,
    else 1) and return a handle; ``on=ALLOC``: on that allocation's node and GPUs instead,
    as a step of it. ``share=["class"]``: publish it to those hub groups (``publish``).
    Refused before launch: a missing model directory, an unknown vLLM flag, a name in use,
    GPUs held by another service, an allocation that is not running."""
    from aifab.models import resolve

    model = resolve(model)  # a name in the site's shared model cache, if there is one
    client = SessionClient()
    if gpus is None and not on:  # (--on: the server's default, from the allocation)
        gpus = 1 if client.session()["visible_gpus"] else 0
    spec = {"kind": "vllm", "name": name or default_name(model), "model": model,
            "gpus": gpus, "tensor_parallel": tensor_parallel,
            "max_model_len": max_model_len, "gpu_memory_utilization": gpu_memory_utilization,
            "loras": {k: kernel_path(v) for k, v in (loras or {}).items()},
            "extra_args": list(extra_args), **({"on": on} if on else {})}
    svc = client.create(spec)
    served = Served(svc["name"], client)
    if share:
        try:
            served.publish(share)
        except Exception:
            client.stop(served.name)  # nothing half-started: a refused share ends the server
            raise
    return served.wait_ready(timeout) if wait else served



def default_name(model: str) -> str:
    import re

    base = model.rstrip("/").rsplit("/", 1)[-1].lower()
    return re.sub(r"[^a-z0-9-]+", "-", base).strip("-")[:40] or "model"
