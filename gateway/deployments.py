"""Deployments: a published model whose replicas are Slurm jobs that the gateway owns on the
owner's behalf, so that they outlive the owner's session.

The gateway submits each replica as the owner (``submit_prefix``, as the spawner's: ``sudo
-E -u OWNER``), with the deployment's walltime (until ``--until``); the job runs
``python -m aifab.extension.replica``, which serves the model on its node and says where in
``DIR/JOB/endpoint.json``. The gateway keeps the replica count: every few seconds (its watch)
it reads the jobs' states from Slurm, gives the router the replicas that answer, and replaces
a replica whose job ended, or that was serving and stopped answering for ``FAIL_GRACE``
seconds (its vLLM died, its node was lost: the job is cancelled, its node avoided for a
while). At ``until`` the deployment ends. Every Slurm command goes through ``aifab.slurm``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pwd
import re
import secrets
import shlex
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from aifab import slurm
from aifab.names import SLURM_NAME

from .registry import Publication

log = logging.getLogger("aifab.gateway")

JOB_NAME = "aifab-deploy"
FAIL_GRACE = 6.0  # seconds a replica that served may fail its health checks before it goes
AVOID_NODE = 600.0  # seconds a node where a replica failed is left out of new submissions
TERMINAL = re.compile(r"^(?:COMPLETED|CANCELLED|FAILED|TIMEOUT|NODE_FAIL|BOOT_FAIL|DEADLINE|"
                      r"OUT_OF_MEMORY|PREEMPTED|SPECIAL_EXIT|REVOKED)")


class DeployError(ValueError):
    """A refused deployment request (400), with what is allowed."""


@dataclass
class DeploySettings:
    """``add_models_service(deploy={...})``: where and how replicas run."""

    partition: str = ""
    dir: str = "{home}/.aifab/deployments"  # {owner}, {home}: the owner's, shared with nodes
    submit_prefix: list[str] = field(default_factory=lambda: ["sudo", "-E", "-u", "{owner}"])
    python: str = ""  # the Python on the nodes with jupyter-aifab (default: the gateway's)
    max_replicas: int = 4
    max_days: float = 14.0
    max_gpus: int = 4
    cpus_per_replica: int = 1
    slurm_conf: str = ""

    @classmethod
    def from_json(cls, text: str) -> DeploySettings | None:
        if not text:
            return None
        value = json.loads(text)
        unknown = set(value) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"deploy: unknown keys {sorted(unknown)}; allowed: "
                             f"{', '.join(cls.__dataclass_fields__)}")
        settings = cls(**value)
        if settings.partition and not SLURM_NAME.fullmatch(settings.partition):
            raise ValueError(f"deploy.partition {settings.partition!r}: a Slurm name")
        return settings


def parse_until(value, now: float, max_days: float) -> float:
    """An ISO time (2026-12-20T18:00, local time if it has no zone) in the future, at most
    ``max_days`` away: its epoch seconds."""
    if not isinstance(value, str):
        raise DeployError("until: an ISO time, e.g. 2026-12-20T18:00")
    try:
        when = datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise DeployError(f"until {value[:40]!r}: an ISO time, e.g. 2026-12-20T18:00") from None
    if when <= now + 60:
        raise DeployError(f"until {value!r} is not in the future")
    if when > now + max_days * 86400:
        raise DeployError(f"until {value!r} is more than {max_days:g} days away, this "
                          "site's longest deployment")
    return when


def check_request(body: dict, settings: DeploySettings, now: float) -> dict:
    """The deployment part of a request: model (a folder), replicas, until, gpus,
    max_model_len. DeployError with the rule otherwise."""
    model = body.get("model")
    if not isinstance(model, str) or not os.path.isabs(model) or not os.path.isdir(model):
        raise DeployError(f"model {str(model)[:200]!r}: the absolute path of a model folder "
                          "that the nodes see (no downloads on the nodes)")
    replicas = body.get("replicas", 1)
    if not isinstance(replicas, int) or isinstance(replicas, bool) or \
            not 1 <= replicas <= settings.max_replicas:
        raise DeployError(f"replicas {replicas!r}: 1 to {settings.max_replicas}")
    gpus = body.get("gpus", 0)
    if not isinstance(gpus, int) or isinstance(gpus, bool) or not 0 <= gpus <= settings.max_gpus:
        raise DeployError(f"gpus {gpus!r}: per replica, 0 (CPU) to {settings.max_gpus}")
    max_len = body.get("max_model_len") or 0
    if not isinstance(max_len, int) or isinstance(max_len, bool) or not 0 <= max_len <= 1 << 20:
        raise DeployError(f"max_model_len {max_len!r}: a whole number of tokens")
    return {"model": model, "replicas": replicas, "gpus": gpus, "max_model_len": max_len,
            "until": parse_until(body.get("until"), now, settings.max_days)}


class Deployer:
    def __init__(self, settings: DeploySettings, registry, python: str):
        self.settings = settings
        self.registry = registry
        self.python = settings.python or python
        self.env = slurm.minimal_env(
            {"SLURM_CONF": settings.slurm_conf} if settings.slurm_conf else None)
        self.avoid: dict[str, float] = {}  # node -> until when it is left out

    # --- where a deployment lives

    def folder(self, owner: str, name: str) -> Path:
        try:
            home = pwd.getpwnam(owner).pw_dir
        except KeyError:
            raise DeployError(f"{owner} is not a user of this machine's Slurm cluster: a "
                              "deployment's replicas run as their owner") from None
        return Path(self.settings.dir.format(owner=owner, home=home)) / name

    def _prepare(self, owner: str, name: str) -> tuple[Path, str]:
        """The deployment's folder, owned by the owner (mode 0700), and its key (0600)."""
        folder = self.folder(owner, name)
        folder.mkdir(parents=True, exist_ok=True)
        user = pwd.getpwnam(owner)
        key = secrets.token_urlsafe(32)
        key_file = folder / "key"
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key)
        if os.geteuid() == 0:
            for path in (folder, key_file):
                os.chown(path, user.pw_uid, user.pw_gid)
        folder.chmod(0o700)
        return folder, key

    # --- Slurm, as the owner

    def _prefix(self, owner: str) -> list[str]:
        return [a.replace("{owner}", owner) for a in self.settings.submit_prefix]

    def script(self, pub: Publication, folder: Path, minutes: int,
               exclude: set[str] = frozenset()) -> str:
        d = pub.deployment
        lines = ["#!/bin/bash", f"#SBATCH --job-name={JOB_NAME}",
                 f"#SBATCH --output={folder}/replica-%j.log", f"#SBATCH --time={minutes}",
                 "#SBATCH --nodes=1", "#SBATCH --ntasks=1",
                 f"#SBATCH --cpus-per-task={self.settings.cpus_per_replica}"]
        if self.settings.partition:
            lines.append(f"#SBATCH --partition={self.settings.partition}")
        if d["gpus"]:
            lines.append(f"#SBATCH --gpus={d['gpus']}")
        avoid = sorted(set(exclude) | {n for n, t in self.avoid.items() if t > time.time()})
        if avoid:
            lines.append(f"#SBATCH --exclude={','.join(avoid)}")
        argv = [self.python, "-m", "aifab.extension.replica", "--dir", str(folder),
                "--model", d["model"], "--served-name", pub.served_name,
                "--gpus", str(d["gpus"]), "--max-model-len", str(d["max_model_len"])]
        return "\n".join(lines) + "\nexec " + shlex.join(argv) + "\n"

    async def submit(self, pub: Publication) -> str:
        """One replica job, on a node that holds no replica of this deployment yet where
        there is one (a lost node then takes one replica, not all), and never on a node
        where a replica failed lately. Waits a few seconds for Slurm to place it."""
        minutes = max(1, int((pub.deployment["until"] - time.time()) // 60))
        folder = self.folder(pub.owner, pub.name)
        exclude = await self._spread(pub)
        out = await slurm.arun(["sbatch", "--parsable"], prefix=self._prefix(pub.owner),
                               stdin=self.script(pub, folder, minutes, exclude), env=self.env)
        job = out.split(";", 1)[0].strip()
        pub.jobs[job] = {"state": "PENDING", "node": "", "url": "", "served": False,
                         "unhealthy_since": None, "submitted": time.time()}
        log.info("aifab-models: %s: submitted replica job %s", pub.id, job)
        for _ in range(20):  # (the next replica's placement depends on this one's)
            state, node = (await self._states([job])).get(job, ("", ""))
            if node and node != "(null)":
                pub.jobs[job].update(state=state, node=node)
                break
            await asyncio.sleep(0.5)
        return job

    async def _spread(self, pub: Publication) -> set[str]:
        """The nodes of this deployment's other replicas, when the partition has others."""
        used = {i["node"] for i in pub.jobs.values() if i["node"]}
        if not used:
            return set()
        argv = ["sinfo", "-h", "-N", "-o", "%N|%T"]
        if self.settings.partition:
            argv[1:1] = ["-p", self.settings.partition]
        try:
            out = await slurm.arun(argv, env=self.env)
        except slurm.SlurmError:
            return set()
        usable = {n for n, _, state in (line.partition("|") for line in out.splitlines())
                  if state.rstrip("*~#") in ("idle", "mixed", "allocated")}
        usable -= {n for n, t in self.avoid.items() if t > time.time()}
        return used if usable - used else set()

    async def cancel(self, pub: Publication, jobs) -> None:
        jobs = [j for j in jobs if re.fullmatch(r"[0-9]+", j)]
        if jobs:
            await slurm.arun(["scancel", *jobs], prefix=self._prefix(pub.owner), env=self.env)

    async def create(self, owner: str, name: str, served_name: str, groups: list[str],
                     request: dict) -> Publication:
        folder, key = self._prepare(owner, name)
        pub = Publication(owner=owner, name=name, served_name=served_name, upstreams=[],
                          key=key, groups=groups, deployment=request,
                          labels={"kind": "deployment", "until": datetime.fromtimestamp(
                              request["until"]).isoformat(timespec="minutes")})
        try:
            for _ in range(request["replicas"]):
                await self.submit(pub)
        except slurm.SlurmError:
            await self.cancel(pub, list(pub.jobs))  # nothing half-started
            raise
        pub.labels["slurm.jobs"] = ",".join(pub.jobs)
        return pub

    # --- keeping the replica count

    async def tick(self, pub: Publication, health: dict[str, bool]) -> bool:
        """One look at a deployment: returns whether it ended (its ``until`` passed)."""
        now = time.time()
        if now >= pub.deployment["until"]:
            return True
        states = await self._states(list(pub.jobs))
        folder = self.folder(pub.owner, pub.name)
        for job, info in list(pub.jobs.items()):
            state, node = states.get(job, ("GONE", info["node"]))
            info["state"], info["node"] = state, node or info["node"]
            if state == "GONE" or TERMINAL.match(state):
                # (its vLLM died and the job ended: the node is not to blame, unless Slurm
                # says so)
                log.warning("aifab-models: %s: replica job %s ended (%s)", pub.id, job, state)
                if state == "NODE_FAIL" and info["node"]:
                    self.avoid[info["node"]] = now + AVOID_NODE
                del pub.jobs[job]
                continue
            if state == "RUNNING" and not info["url"]:
                info["url"] = await self._url(folder / job / "endpoint.json", node)
            if not info["url"]:
                continue
            if health.get(info["url"]):
                info["served"], info["unhealthy_since"] = True, None
            elif info["served"]:
                info["unhealthy_since"] = info["unhealthy_since"] or now
                if now - info["unhealthy_since"] >= FAIL_GRACE:
                    log.warning("aifab-models: %s: replica job %s on %s stopped answering; "
                                "replacing it", pub.id, job, info["node"])
                    self.avoid[info["node"]] = now + AVOID_NODE
                    del pub.jobs[job]
                    try:
                        await self.cancel(pub, [job])
                    except slurm.SlurmError as exc:  # a lost node: Slurm ends it later
                        log.warning("aifab-models: scancel %s: %s", job, exc)
        while len(pub.jobs) < pub.deployment["replicas"]:
            await self.submit(pub)
        pub.upstreams = [i["url"] for i in pub.jobs.values() if i["url"]]
        pub.labels["slurm.jobs"] = ",".join(pub.jobs)
        self.registry.save()
        return False

    async def _states(self, jobs: list[str]) -> dict[str, tuple[str, str]]:
        """Slurm's state and node of ``jobs`` (by the replicas' job name, not ``-j``: squeue
        refuses ids it has purged); a job not listed has ended."""
        if not jobs:
            return {}
        out = await slurm.arun(["squeue", "-h", f"--name={JOB_NAME}", "-o", "%i|%T|%N"],
                               env=self.env)
        rows = (line.split("|") for line in out.splitlines() if line.count("|") == 2)
        return {job: (state, node) for job, state, node in rows if job in jobs}

    async def _url(self, endpoint: Path, node: str) -> str:
        try:
            port = int(json.loads(endpoint.read_text())["port"])
        except (OSError, ValueError, KeyError):
            return ""  # the replica has not started its front yet
        out = await slurm.arun(["scontrol", "show", "node", "-o", node], env=self.env)
        m = re.search(r"\bNodeAddr=(\S+)", out)
        host = m.group(1) if m else node
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def logs(self, pub: Publication, job: str, n: int) -> dict[str, list[str]]:
        folder = self.folder(pub.owner, pub.name)
        out = {}
        for what in ("replica", "vllm"):
            path = folder / f"{what}-{job}.log"
            try:
                out[what] = path.read_text(errors="replace").splitlines()[-n:]
            except OSError:
                out[what] = []
        return out

