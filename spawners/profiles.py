"""Profiles: what an admin offers, checked once at hub start.

A profile is plain data (from traitlets config or a YAML file). ``load_profiles`` turns the
admin's dicts into frozen objects and refuses a mistake with the profile and field named, so
a typo fails the hub's start rather than a user's spawn.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aifab.allocation import Allowance
from aifab.names import SLURM_NAME, SLURM_NAME_RULE
from aifab.session import ENV_MODEL_CACHE, SLURM_PREFIX, SPAWNER_SET
from aifab.walltime import format_walltime, is_ambiguous, parse_walltime, readings

__all__ = ["format_walltime", "parse_walltime"]  # re-exported: the one parser is aifab.walltime

BACKENDS = ("local", "slurm", "kubernetes")
SLUG = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?")
# Slurm constraint expressions: features joined by & | , with optional brackets and counts
SLURM_CONSTRAINT = re.compile(r"[A-Za-z0-9_.&|,\[\]()*:-]{1,128}")
GRES_TYPE = re.compile(r"[A-Za-z0-9_-]{1,32}")
K8S_NAME = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")
K8S_RESOURCE = re.compile(r"(?:[a-z0-9.-]+/)?[A-Za-z0-9_.-]{1,63}")
IMAGE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

CACHE_PATH = re.compile(r"/[A-Za-z0-9_./-]{0,1000}")
ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,127}")
# set by the spawner (the session contract, the model cache): not a profile's to change
RESERVED_ENV = {*SPAWNER_SET, "HF_HUB_CACHE", "HF_HUB_OFFLINE", "CUDA_VISIBLE_DEVICES"}
CHOICE_KEYS = ("gpus", "cpus", "memory_gb", "walltime", "image", "nodes")
PROFILE_KEYS = {
    "slug", "display_name", "description", "backend", "default", "allowed_users",
    "allowed_groups", "choices", "slurm", "kubernetes", "local", "model_cache", "environment",
}
SLURM_KEYS = {
    "partition", "account", "qos", "reservation", "constraint", "gres_type", "prologue",
    "exclusive",
}
K8S_KEYS = {
    "namespace", "node_selector", "tolerations", "gpu_resource", "storage_class",
    "storage_capacity", "service_account",
}


class ProfileConfigError(ValueError):
    """An admin's profile definition is wrong; the message names the profile and field."""


@dataclass(frozen=True)
class IntRange:
    default: int
    min: int
    max: int

    def describe(self, unit: str = "") -> str:
        return f"{self.min}-{self.max}{unit} (default {self.default}{unit})"


@dataclass(frozen=True)
class Choices:
    gpus: IntRange = IntRange(0, 0, 0)
    cpus: IntRange = IntRange(1, 1, 1)
    memory_gb: IntRange = IntRange(2, 1, 2)
    walltime: IntRange = IntRange(3600, 60, 3600)  # seconds
    # nodes of an allocation a session holds (a session itself is one node)
    nodes: IntRange = IntRange(1, 1, 1)
    # user-visible key -> the admin's image / uenv / container reference
    images: Mapping[str, str] = field(default_factory=dict)
    default_image: str = ""


@dataclass(frozen=True)
class SlurmSettings:
    partition: str = ""
    account: str = ""
    qos: str = ""
    reservation: str = ""
    constraint: str = ""
    gres_type: str = ""  # e.g. "gh200" -> --gres=gpu:gh200:N
    prologue: str = ""  # admin's shell lines run before the server (module load, uenv ...)
    exclusive: bool = False


@dataclass(frozen=True)
class KubernetesSettings:
    namespace: str = ""
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping, ...] = ()
    gpu_resource: str = "nvidia.com/gpu"
    storage_class: str = ""
    storage_capacity: str = ""
    service_account: str = ""


@dataclass(frozen=True)
class Profile:
    slug: str
    display_name: str
    backend: str
    description: str = ""
    default: bool = False
    allowed_users: frozenset[str] = frozenset()
    allowed_groups: frozenset[str] = frozenset()
    choices: Choices = Choices()
    slurm: SlurmSettings = SlurmSettings()
    kubernetes: KubernetesSettings = KubernetesSettings()
    # a shared, read-only folder of models (a workshop's: nobody downloads weights)
    model_cache: str = ""
    environment: Mapping[str, str] = field(default_factory=dict)

    def session_environment(self) -> dict[str, str]:
        """What the profile adds to the session's environment."""
        env = dict(self.environment)
        if self.model_cache:
            env.update({ENV_MODEL_CACHE: self.model_cache,
                        # Hugging Face names (org/model) resolve from the cache, offline
                        "HF_HUB_CACHE": self.model_cache, "HF_HUB_OFFLINE": "1"})
        return env

    def allowance(self):
        """What a session may allocate with this Slurm profile (aifab.allocation)."""
        c, s = self.choices, self.slurm
        return Allowance(
            profile=self.slug, partition=s.partition, account=s.account, qos=s.qos,
            reservation=s.reservation, constraint=s.constraint, gres_type=s.gres_type,
            max_nodes=c.nodes.max, max_gpus=c.gpus.max, max_cpus=c.cpus.max,
            max_memory_gb=c.memory_gb.max, max_walltime_s=c.walltime.max,
            default_walltime_s=c.walltime.default)

    def visible_to(self, username: str, groups: Sequence[str], admin: bool) -> bool:
        if admin or not (self.allowed_users or self.allowed_groups):
            return True
        return username in self.allowed_users or bool(self.allowed_groups.intersection(groups))


def load_profiles(raw: Sequence[Mapping]) -> list[Profile]:
    """Check and freeze the admin's profile list. Raises ProfileConfigError."""
    if not raw:
        raise ProfileConfigError("no profiles configured: PlacementSpawner.profiles is empty")
    profiles = [_profile(i, p) for i, p in enumerate(raw)]
    seen: set[str] = set()
    for p in profiles:
        if p.slug in seen:
            raise ProfileConfigError(f"profile {p.slug!r}: slug used twice; slugs must be unique")
        seen.add(p.slug)
    if sum(p.default for p in profiles) > 1:
        names = [p.slug for p in profiles if p.default]
        raise ProfileConfigError(f"profiles {names}: more than one has default: true")
    return profiles


def load_profiles_file(path: str | Path) -> list[dict]:
    """Read a YAML file holding a list of profiles (or {'profiles': [...]})."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ProfileConfigError(f"profiles file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ProfileConfigError(f"profiles file {path}: not valid YAML: {exc}") from exc
    if isinstance(data, dict) and "profiles" in data:
        data = data["profiles"]
    if not isinstance(data, list):
        raise ProfileConfigError(f"profiles file {path}: expected a list of profiles")
    return data


# ---------------------------------------------------------------- parsing one profile
def _profile(index: int, raw: Mapping) -> Profile:
    if not isinstance(raw, Mapping):
        raise ProfileConfigError(f"profile #{index + 1}: expected a mapping, got {raw!r}")
    name = raw.get("slug") or f"#{index + 1}"

    def err(fieldname: str, msg: str) -> ProfileConfigError:
        return ProfileConfigError(f"profile {name!r}, field {fieldname!r}: {msg}")

    unknown = set(raw) - PROFILE_KEYS
    if unknown:
        raise err(sorted(unknown)[0], f"unknown field; allowed: {', '.join(sorted(PROFILE_KEYS))}")
    slug = raw.get("slug")
    if not isinstance(slug, str) or not SLUG.fullmatch(slug):
        raise err("slug", "required; lowercase letters, digits and '-', at most 40")
    backend = raw.get("backend")
    if backend not in BACKENDS:
        raise err("backend", f"{backend!r} is not one of {', '.join(BACKENDS)}")
    display = raw.get("display_name", slug)
    if not isinstance(display, str) or not display.strip():
        raise err("display_name", "must be a non-empty string")
    for key in ("allowed_users", "allowed_groups"):
        if not isinstance(raw.get(key, []), (list, tuple, set, frozenset)):
            raise err(key, "must be a list of names")
    choices = _choices(raw.get("choices") or {}, err)
    slurm = _slurm(raw.get("slurm") or {}, err) if backend == "slurm" else SlurmSettings()
    k8s = (_kubernetes(raw.get("kubernetes") or {}, err)
           if backend == "kubernetes" else KubernetesSettings())
    if backend == "kubernetes" and choices.gpus.max > 0 and not k8s.gpu_resource:
        raise err("kubernetes.gpu_resource", "needed when the profile offers GPUs")
    if backend == "kubernetes" and not choices.images:
        raise err("choices.image", "a kubernetes profile needs at least one image")
    for other in ("slurm", "kubernetes"):
        if other != backend and raw.get(other):
            raise err(other, f"set, but the profile's backend is {backend!r}")
    model_cache = raw.get("model_cache", "")
    if model_cache and (not isinstance(model_cache, str) or not CACHE_PATH.fullmatch(model_cache)):
        raise err("model_cache", "an absolute path (letters, digits, / . _ -)")
    environment = raw.get("environment") or {}
    if not isinstance(environment, Mapping):
        raise err("environment", "expected {NAME: value}")
    for key, value in environment.items():
        if not isinstance(key, str) or not ENV_NAME.fullmatch(key) \
                or key.startswith((SLURM_PREFIX, "JUPYTERHUB_")) or key in RESERVED_ENV:
            raise err(f"environment.{key}", "a variable name in capitals, not one the session "
                      "contract or JupyterHub sets")
        if not isinstance(value, (str, int, float)) or any(c in str(value) for c in "\n\r\0"):
            raise err(f"environment.{key}", "one line of text")
    return Profile(
        slug=slug,
        display_name=display,
        backend=backend,
        description=str(raw.get("description", "")),
        default=bool(raw.get("default", False)),
        allowed_users=frozenset(map(str, raw.get("allowed_users", []))),
        allowed_groups=frozenset(map(str, raw.get("allowed_groups", []))),
        choices=choices,
        slurm=slurm,
        kubernetes=k8s,
        model_cache=model_cache,
        environment={k: str(v) for k, v in environment.items()},
    )


def _int_range(raw, fieldname, err, lo_bound: int, defaults: IntRange) -> IntRange:
    if raw is None:
        return defaults
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = {"default": raw, "min": raw, "max": raw}
    if not isinstance(raw, Mapping) or set(raw) - {"default", "min", "max"}:
        raise err(fieldname, "expected {default: N, min: N, max: N}")
    vals = {}
    for k in ("default", "min", "max"):
        v = raw.get(k, raw.get("default") if k != "default" else raw.get("min", defaults.default))
        if not isinstance(v, int) or isinstance(v, bool) or v < lo_bound:
            raise err(f"{fieldname}.{k}", f"must be an integer >= {lo_bound}, got {v!r}")
        vals[k] = v
    if not vals["min"] <= vals["default"] <= vals["max"]:
        raise err(fieldname, f"needs min <= default <= max, got {vals}")
    return IntRange(**vals)


def _choices(raw: Mapping, err) -> Choices:
    if not isinstance(raw, Mapping):
        raise err("choices", "expected a mapping")
    unknown = set(raw) - set(CHOICE_KEYS)
    if unknown:
        raise err(f"choices.{sorted(unknown)[0]}",
                  f"unknown choice; allowed: {', '.join(CHOICE_KEYS)}")
    wt = raw.get("walltime")
    if wt is not None:
        if not isinstance(wt, Mapping) or set(wt) - {"default", "min", "max"}:
            raise err("choices.walltime", "expected {default: HH:MM:SS, max: HH:MM:SS}")
        secs = {k: _profile_walltime(v, f"choices.walltime.{k}", err) for k, v in wt.items()}
        secs.setdefault("max", secs.get("default", 3600))
        secs.setdefault("default", secs["max"])
        secs.setdefault("min", min(60, secs["default"]))
        walltime = _int_range(secs, "choices.walltime", err, 60, Choices.walltime)
    else:
        walltime = Choices.walltime
    images: dict[str, str] = {}
    default_image = ""
    img = raw.get("image")
    if img is not None:
        if not isinstance(img, Mapping) or not isinstance(img.get("allowed"), Mapping) \
                or not img["allowed"]:
            raise err("choices.image", "expected {default: KEY, allowed: {KEY: image-or-uenv}}")
        for key, ref in img["allowed"].items():
            if not isinstance(key, str) or not IMAGE_KEY.fullmatch(key):
                raise err("choices.image.allowed", f"key {key!r}: letters, digits, . _ -")
            if not isinstance(ref, str) or not ref.strip() or any(c in ref for c in "\n\r\0 "):
                raise err(f"choices.image.allowed.{key}", "must be one image/uenv reference")
            images[key] = ref
        default_image = img.get("default", next(iter(images)))
        if default_image not in images:
            raise err("choices.image.default", f"{default_image!r} is not in allowed")
    return Choices(
        gpus=_int_range(raw.get("gpus"), "choices.gpus", err, 0, Choices.gpus),
        cpus=_int_range(raw.get("cpus"), "choices.cpus", err, 1, Choices.cpus),
        memory_gb=_int_range(raw.get("memory_gb"), "choices.memory_gb", err, 1, Choices.memory_gb),
        walltime=walltime,
        nodes=_int_range(raw.get("nodes"), "choices.nodes", err, 1, Choices.nodes),
        images=images,
        default_image=default_image,
    )


def _profile_walltime(value, fieldname: str, err) -> int:
    """A profile's walltime as Slurm reads it, refusing what an admin may have meant otherwise:
    a two-field A:B (older aifab read it as HH:MM, Slurm reads MM:SS) and a YAML number
    (unquoted 12:00:00 is YAML's base-60 number 43200)."""
    if not isinstance(value, str):
        raise err(fieldname, f"{value!r}: write the walltime as a quoted string, e.g. "
                             '"12:00:00" (YAML reads an unquoted 12:00:00 as a number)')
    if is_ambiguous(value):
        raise err(fieldname, f"{readings(value)} (write HH:MM:SS in a profile)")
    try:
        return parse_walltime(value)
    except ValueError as exc:
        raise err(fieldname, str(exc)) from None


def _slurm(raw: Mapping, err) -> SlurmSettings:
    if not isinstance(raw, Mapping):
        raise err("slurm", "expected a mapping")
    unknown = set(raw) - SLURM_KEYS
    if unknown:
        raise err(f"slurm.{sorted(unknown)[0]}",
                  f"unknown; allowed: {', '.join(sorted(SLURM_KEYS))}")
    out = {}
    for key in ("partition", "account", "qos", "reservation"):
        v = raw.get(key, "")
        if v and (not isinstance(v, str) or not SLURM_NAME.fullmatch(v)):
            raise err(f"slurm.{key}", f"{v!r} is not {SLURM_NAME_RULE}")
        out[key] = v or ""
    c = raw.get("constraint", "")
    if c and (not isinstance(c, str) or not SLURM_CONSTRAINT.fullmatch(c)):
        raise err("slurm.constraint", f"{c!r} is not a Slurm constraint expression")
    g = raw.get("gres_type", "")
    if g and (not isinstance(g, str) or not GRES_TYPE.fullmatch(g)):
        raise err("slurm.gres_type", f"{g!r}: the GPU type alone, e.g. gh200")
    pro = raw.get("prologue", "")
    if not isinstance(pro, str) or any(
        line.lstrip().startswith("#SBATCH") for line in pro.splitlines()
    ):
        raise err("slurm.prologue", "shell lines as a string, with no #SBATCH directives")
    return SlurmSettings(**out, constraint=c or "", gres_type=g or "", prologue=pro,
                         exclusive=bool(raw.get("exclusive", False)))


def _kubernetes(raw: Mapping, err) -> KubernetesSettings:
    if not isinstance(raw, Mapping):
        raise err("kubernetes", "expected a mapping")
    unknown = set(raw) - K8S_KEYS
    if unknown:
        raise err(f"kubernetes.{sorted(unknown)[0]}",
                  f"unknown; allowed: {', '.join(sorted(K8S_KEYS))}")
    ns = raw.get("namespace", "")
    if ns and not K8S_NAME.fullmatch(str(ns)):
        raise err("kubernetes.namespace", f"{ns!r} is not a Kubernetes name")
    sel = raw.get("node_selector", {}) or {}
    if not isinstance(sel, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in sel.items()
    ):
        raise err("kubernetes.node_selector", "expected a mapping of label -> value strings")
    tol = raw.get("tolerations", []) or []
    if not isinstance(tol, list) or not all(isinstance(t, Mapping) for t in tol):
        raise err("kubernetes.tolerations", "expected a list of toleration mappings")
    res = raw.get("gpu_resource", "nvidia.com/gpu")
    if not isinstance(res, str) or not K8S_RESOURCE.fullmatch(res):
        raise err("kubernetes.gpu_resource", f"{res!r} is not a resource name like nvidia.com/gpu")
    sa = raw.get("service_account", "")
    if sa and not K8S_NAME.fullmatch(str(sa)):
        raise err("kubernetes.service_account", f"{sa!r} is not a Kubernetes name")
    cap = str(raw.get("storage_capacity", "") or "")
    if cap and not re.fullmatch(r"[0-9]+(?:Ki|Mi|Gi|Ti)?", cap):
        raise err("kubernetes.storage_capacity", f"{cap!r} is not a quantity like 10Gi")
    return KubernetesSettings(
        namespace=str(ns or ""), node_selector=dict(sel), tolerations=tuple(tol),
        gpu_resource=res, storage_class=str(raw.get("storage_class", "") or ""),
        storage_capacity=cap, service_account=str(sa or ""),
    )
