"""The gateway's registry of published models, keyed ``OWNER/NAME``, kept on disk
(``STATE/registry.json``, mode 0600, replaced atomically) so that a restarted gateway (a
restarted hub starts its managed services again) finds every publication again.

A publication holds where its replicas answer (the ``/aifab/published/NAME`` route of the
owner's Jupyter server), the key those routes demand (made by the owner's server; it is
never shown by the API), the groups the owner shared it with, and labels for people.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from aifab.names import HUB_GROUP, HUB_GROUP_RULE

# A hub user name as it can appear in a model id (JupyterHub allows more in names; a model
# id also travels in JSON bodies and logs, so it is held to these characters).
OWNER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
# the same rule as a session service's name (aifab.names.SERVICE_NAME): a published model
# is one of the owner's services
MODEL_ID = re.compile(rf"({OWNER.pattern})/([a-z0-9](?:[a-z0-9-]{{0,38}}[a-z0-9])?)")
MODEL_ID_RULE = ("OWNER/NAME, a hub user name and the name of the service it published "
                 "(lowercase letters, digits and '-'), e.g. 'teacher/chat'")
LABEL_KEY = re.compile(r"[a-z][a-z0-9_.-]{0,39}")


def parse_model_id(value) -> tuple[str, str]:
    """(owner, name) of a request's ``model``; ValueError with the rule otherwise."""
    m = MODEL_ID.fullmatch(value) if isinstance(value, str) else None
    if not m:
        raise ValueError(f"model {str(value)[:80]!r} is not a published model's id: "
                         f"{MODEL_ID_RULE}")
    return m.group(1), m.group(2)


def check_groups(groups) -> list[str]:
    if not isinstance(groups, list) or not groups:
        raise ValueError("groups: a non-empty list of hub group names")
    for g in groups:
        if not isinstance(g, str) or not HUB_GROUP.fullmatch(g):
            raise ValueError(f"group {str(g)[:80]!r}: {HUB_GROUP_RULE}")
    return sorted(set(groups))


@dataclass
class Publication:
    owner: str
    name: str
    served_name: str  # the model name vLLM answers to
    upstreams: list[str]  # base URLs of the replicas (vllm-router's workers)
    key: str  # what the replicas' routes demand: never shown, never logged
    groups: list[str]
    labels: dict[str, str] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    # a deployment (replicas as Slurm jobs the gateway keeps): its request, and its jobs by
    # id ({"state", "node", "url", "served", "unhealthy_since"}); empty for a session's
    deployment: dict = field(default_factory=dict)
    jobs: dict[str, dict] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.owner}/{self.name}"

    def public(self, health: dict[str, bool] | None = None) -> dict:
        d = asdict(self)
        d.pop("key")
        d["id"] = self.id
        d["health"] = health or {}
        return d


class Registry:
    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / "registry.json"
        self.models: dict[str, Publication] = {}
        if self.path.exists():
            for item in json.loads(self.path.read_text()):
                pub = Publication(**item)
                self.models[pub.id] = pub

    def get(self, model_id: str) -> Publication | None:
        return self.models.get(model_id)

    def put(self, pub: Publication) -> None:
        self.models[pub.id] = pub
        self._save()

    def save(self) -> None:
        """After a publication changed in place (a deployment's jobs)."""
        self._save()

    def remove(self, model_id: str) -> Publication | None:
        pub = self.models.pop(model_id, None)
        if pub is not None:
            self._save()
        return pub

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump([asdict(p) for p in self.models.values()], f, indent=1)
        os.replace(tmp, self.path)
