"""`aifab doctor` as a user runs it: a real subprocess, a real Slurm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

AIFAB = str(Path(sys.executable).parent / "aifab")


def doctor(env: dict) -> dict:
    out = subprocess.run([AIFAB, "doctor", "--json"], env=env, capture_output=True, text=True,
                         timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    return {c["name"]: c for c in json.loads(out.stdout)}


def base_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIFAB_", "SLURM", "CUDA_", "NVIDIA_", "KUBERNETES_"))}
    env.update(extra)
    return env


@pytest.mark.slurm
def test_doctor_sees_the_session_slurm_and_gpus(slurm):
    checks = doctor(base_env(
        SLURM_CONF=str(slurm.conf_path), AIFAB_BACKEND="slurm", AIFAB_PROFILE="gh200",
        AIFAB_GPUS="2", CUDA_VISIBLE_DEVICES="0,1", AIFAB_WALLTIME_END="4102444800",
        AIFAB_SLURM_JOB_ID="17"))
    s = checks["session"]
    assert s["status"] == "ok"
    assert "backend=slurm" in s["detail"] and "profile=gh200" in s["detail"]
    assert "slurm job 17" in s["detail"] and "walltime left" in s["detail"]
    assert checks["slurm"]["status"] == "ok"
    assert "debug" in checks["slurm"]["detail"] and "gh200" in checks["slurm"]["detail"]
    gpus = checks["gpus"]
    assert "visible: 0,1" in gpus["detail"]
    # no NVIDIA driver here: says so and how to learn the physical GPUs
    assert gpus["status"] == "warn" and gpus["hint"]
    assert checks["torch"]["status"] == "ok"


def test_doctor_without_slurm_or_gpus_gives_hints(tmp_path):
    checks = doctor(base_env(PATH=f"{tmp_path}:/usr/bin:/bin"))
    assert checks["session"]["detail"].startswith("backend=local")
    assert "detected" in checks["session"]["hint"]
    assert checks["gpus"]["status"] == "warn" and "CPU only" in checks["gpus"]["hint"]
    for name in ("slurm", "vllm", "fine-tuning", "torch"):
        c = checks[name]
        assert c["status"] == "ok" or c["hint"], c


def test_doctor_names_a_bad_contract_value():
    checks = doctor(base_env(AIFAB_BACKEND="slurm", AIFAB_GPUS="lots"))
    assert checks["session"]["status"] == "warn"
    assert "AIFAB_GPUS='lots'" in checks["session"]["detail"]


def test_doctor_text_output_has_one_line_per_check():
    out = subprocess.run([AIFAB, "doctor"], env=base_env(), capture_output=True, text=True,
                         timeout=60, cwd="/")
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("[")]
    assert [ln.split()[1] for ln in lines] == ["session", "slurm", "gpus", "torch", "vllm",
                                               "fine-tuning", "models"]


def test_doctor_lists_the_shared_model_cache_as_a_participant_sees_it(work_root, test_user):
    """A workshop's cache: models by name, read-only for the participant."""
    import json

    cache = work_root / "models"
    (cache / "tiny-llama").mkdir(parents=True)
    (cache / "tiny-llama" / "config.json").write_text("{}")
    (cache / "not-a-model").mkdir()
    for d in (cache, cache / "tiny-llama"):
        d.chmod(0o755)
    out = subprocess.run(["sudo", "-u", test_user.pw_name, "env", f"AIFAB_MODEL_CACHE={cache}",
                          AIFAB, "doctor", "--json"], capture_output=True, text=True,
                         timeout=60, cwd="/")
    models = next(c for c in json.loads(out.stdout) if c["name"] == "models")
    assert models["status"] == "ok"
    assert models["detail"] == f"shared model cache {cache} (read-only): tiny-llama"
    missing = doctor(base_env(AIFAB_MODEL_CACHE=str(work_root / "nowhere")))["models"]
    assert missing["status"] == "warn" and "not reachable" in missing["detail"]
