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
import math
import os
import pwd
import re
import secrets
import shlex
import stat
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


# run as the owner: the folder (0700) and the key (0600, a new file: never through a link)
_WRITE_KEY = """
import os, sys
folder = sys.argv[1]
os.makedirs(folder, mode=0o700, exist_ok=True)
os.chmod(folder, 0o700, follow_symlinks=False)
key = os.path.join(folder, "key")
try:
    os.unlink(key)
except FileNotFoundError:
    pass
fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
os.write(fd, sys.stdin.buffer.read())
os.close(fd)
"""
# the most the gateway reads of a file in an owner's folder (a log's tail, endpoint.json)
READ_CAP = 256 * 1024


def read_owned(path: Path, uid: int, cap: int = READ_CAP) -> str:
    """The last ``cap`` bytes of a regular file that ``uid`` owns, never through a symlink
    and never blocking (a FIFO): the gateway runs as root and the folder is the owner's.
    OSError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != uid:
            raise OSError(f"{path.name}: not a regular file of the deployment's owner")
        os.lseek(fd, max(0, st.st_size - cap), os.SEEK_SET)
        return os.read(fd, cap).decode(errors="replace")
    finally:
        os.close(fd)


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
    min_uid: int = 1000  # no deployments as root or a system account
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
        self._backoff: dict[str, float] = {}  # deployment -> no submission before then

    # --- where a deployment lives

    def folder(self, owner: str, name: str) -> Path:
        try:
            home = pwd.getpwnam(owner).pw_dir
        except KeyError:
            raise DeployError(f"{owner} is not a user of this machine's Slurm cluster: a "
                              "deployment's replicas run as their owner") from None
        return Path(self.settings.dir.format(owner=owner, home=home)) / name

    def owner_uid(self, owner: str) -> int:
        """The owner's Unix uid; DeployError for no such user or a system account."""
        try:
            uid = pwd.getpwnam(owner).pw_uid
        except KeyError:
            raise DeployError(f"{owner} is not a user of this machine's Slurm cluster: a "
                              "deployment's replicas run as their owner") from None
        if uid < self.settings.min_uid:
            raise DeployError(f"{owner} is a system account (uid {uid}): deployments run as "
                              f"users with a uid of {self.settings.min_uid} or more")
        return uid

    async def _prepare(self, owner: str, name: str) -> tuple[Path, str]:
        """The deployment's folder (mode 0700) and its key (0600), made by a child process
        running **as the owner** (the folder is in the owner's space: as root, a symlink
        planted there would make the gateway write or chown a file of the system's)."""
        uid = self.owner_uid(owner)
        folder = self.folder(owner, name)
        key = secrets.token_urlsafe(32)
        as_owner = {}
        if os.geteuid() == 0:
            user = pwd.getpwuid(uid)
            as_owner = {"user": uid, "group": user.pw_gid, "extra_groups": []}
        proc = await asyncio.create_subprocess_exec(
            self.python, "-c", _WRITE_KEY, str(folder), stdin=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env={"PATH": os.defpath}, **as_owner)
        _, err = await asyncio.wait_for(proc.communicate(key.encode()), 30)
        if proc.returncode != 0:
            raise DeployError(f"the deployment's folder {folder} could not be made as "
                              f"{owner}: {err.decode(errors='replace').strip()[-300:]}")
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
                 # a requeued job would come back elsewhere with another address: the
                 # gateway submits a replacement instead
                 "#SBATCH --no-requeue",
                 f"#SBATCH --cpus-per-task={self.settings.cpus_per_replica}"]
        if self.settings.partition:
            lines.append(f"#SBATCH --partition={self.settings.partition}")
        if d["gpus"]:
            lines.append(f"#SBATCH --gpus={d['gpus']}")
        if exclude:
            lines.append(f"#SBATCH --exclude={','.join(sorted(exclude))}")
        argv = [self.python, "-m", "aifab.extension.replica", "--dir", str(folder),
                "--model", d["model"], "--served-name", pub.served_name,
                "--gpus", str(d["gpus"]), "--max-model-len", str(d["max_model_len"])]
        return "\n".join(lines) + "\nexec " + shlex.join(argv) + "\n"

    async def submit(self, pub: Publication) -> str:
        """One replica job, on a node that holds no replica of this deployment yet where
        there is one (a lost node then takes one replica, not all), and never on a node
        where a replica failed lately. Waits a few seconds for Slurm to place it."""
        minutes = max(1, math.ceil((pub.deployment["until"] - time.time()) / 60))
        folder = self.folder(pub.owner, pub.name)
        exclude = await self._spread(pub)
        out = await slurm.arun(["sbatch", "--parsable"], prefix=self._prefix(pub.owner),
                               stdin=self.script(pub, folder, minutes, exclude), env=self.env)
        job = out.split(";", 1)[0].strip()
        pub.jobs[job] = {"state": "PENDING", "node": "", "url": "", "served": False,
                         "unhealthy_since": None, "submitted": time.time()}
        log.info("aifab-models: %s: submitted replica job %s", pub.id, job)
        for _ in range(10):  # (the next replica's placement depends on this one's)
            state, node = (await self._states([job])).get(job, ("", ""))
            if node and node != "(null)":
                pub.jobs[job].update(state=state, node=node)
                break
            await asyncio.sleep(0.5)
        return job

    async def _spread(self, pub: Publication) -> set[str]:
        """The nodes to leave out: where a replica failed lately and where this deployment's
        other replicas run, as long as a usable node is left (else fewer of them)."""
        now = time.time()
        avoid = {n for n, t in self.avoid.items() if t > now}
        used = {i["node"] for i in pub.jobs.values() if i["node"]}
        if not used and not avoid:
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
        for exclude in (avoid | used, avoid):
            if usable - exclude:
                return exclude
        return set()

    async def cancel(self, pub: Publication, jobs) -> None:
        jobs = [j for j in jobs if re.fullmatch(r"[0-9]+", j)]
        if jobs:
            await slurm.arun(["scancel", *jobs], prefix=self._prefix(pub.owner), env=self.env)

    async def create(self, owner: str, name: str, served_name: str, groups: list[str],
                     request: dict) -> Publication:
        folder, key = await self._prepare(owner, name)
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

    async def tick(self, pub: Publication, probe, still_there) -> bool:
        """One look at a deployment: returns whether it ended (its ``until`` passed).
        ``probe(url)``: whether a replica answers its /health (asked of the replica itself);
        ``still_there()``: whether the deployment is still registered (not undeployed while
        this look waited on Slurm)."""
        now = time.time()
        if now >= pub.deployment["until"]:
            return True
        states = await self._states(list(pub.jobs))
        uid = self.owner_uid(pub.owner)
        folder = self.folder(pub.owner, pub.name)
        for job, info in list(pub.jobs.items()):
            if job not in states and now - info.get("submitted", 0) < 60:
                continue  # (just submitted: not listed yet)
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
                info["url"] = await self._url(folder / job / "endpoint.json", uid, info)
            if not info["url"]:
                continue
            if await probe(info["url"]):
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
        # what answers goes to the router first; then the replacements, if any are due
        pub.upstreams = [i["url"] for i in pub.jobs.values() if i["url"]]
        pub.labels["slurm.jobs"] = ",".join(pub.jobs)
        if not still_there():
            return False
        self.registry.save()
        if pub.deployment["until"] - now < 120 or now < self._backoff.get(pub.id, 0):
            return False  # (no replica for its last two minutes; or after a refused sbatch)
        while len(pub.jobs) < pub.deployment["replicas"] and still_there():
            try:
                await self.submit(pub)
            except slurm.SlurmError as exc:
                self._backoff[pub.id] = time.time() + 30
                log.error("aifab-models: %s: a replacement replica was refused: %s; trying "
                          "again in 30 s", pub.id, exc)
                break
        pub.labels["slurm.jobs"] = ",".join(pub.jobs)
        if still_there():
            self.registry.save()
        return False

    async def _states(self, jobs: list[str]) -> dict[str, tuple[str, str]]:
        """Slurm's state and node of ``jobs``: by the replicas' job name (``-j`` fails on ids
        Slurm has purged), in every partition (``-a``), finished ones too (``-t all``)."""
        if not jobs:
            return {}
        out = await slurm.arun(["squeue", "-h", "-a", "-t", "all", f"--name={JOB_NAME}",
                                "-o", "%i|%T|%N"], env=self.env)
        rows = (line.split("|") for line in out.splitlines() if line.count("|") == 2)
        return {job: (state, node) for job, state, node in rows if job in jobs}

    async def _url(self, endpoint: Path, uid: int, info: dict) -> str:
        """Where the replica of a running job listens: its endpoint.json (written by this
        job on its node, after it was submitted), at the node's NodeAddr."""
        try:
            written = json.loads(read_owned(endpoint, uid))
            port = int(written["port"])
            fresh = os.stat(endpoint, follow_symlinks=False).st_mtime >= info["submitted"] - 5
        except (OSError, ValueError, KeyError, TypeError):
            return ""  # the replica has not started its front yet
        if not fresh or written.get("node") != info["node"] or not 0 < port < 65536:
            return ""  # one of an earlier job with the same id, or not this node's
        out = await slurm.arun(["scontrol", "show", "node", "-o", info["node"]], env=self.env)
        m = re.search(r"\bNodeAddr=(\S+)", out)
        host = m.group(1) if m else info["node"]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def logs(self, pub: Publication, job: str, n: int) -> dict[str, list[str]]:
        """The last ``n`` lines of a replica's logs, read as the gateway may read a file in
        an owner's folder (``read_owned``)."""
        uid = self.owner_uid(pub.owner)
        folder = self.folder(pub.owner, pub.name)
        out = {}
        for what in ("replica", "vllm"):
            try:
                out[what] = read_owned(folder / f"{what}-{job}.log", uid).splitlines()[-n:]
            except OSError:
                out[what] = []
        return out
