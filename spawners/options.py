"""User options: parse (no side effects), then validate against the profile's allow-lists.

The options form and the REST API (``POST /hub/api/users/NAME/server`` with a JSON body) both
end up in :func:`validate_options`; the only way to a child spawner is the frozen
:class:`Placement` it returns. No user string is passed on: profiles and images are chosen
by key from the admin's lists, numbers are checked against the profile's bounds.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from aifab.walltime import format_walltime, is_ambiguous, parse_walltime, readings

from .profiles import IntRange, Profile

OPTION_KEYS = ("profile", "gpus", "cpus", "memory_gb", "walltime", "image")
_INT = re.compile(r"[0-9]{1,9}")
# What may become a Unix account name on a cluster (sudo -u NAME, sbatch as NAME).
UNIX_USERNAME = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")


_ABSENT = object()  # an option not given at all (an explicit null is a mistake)


class OptionsError(ValueError):
    """A user's option is not allowed. ``field`` names it; the message says what is."""

    def __init__(self, field: str, message: str):
        super().__init__(f"option {field!r}: {message}")
        self.field = field


@dataclass(frozen=True)
class Placement:
    """Validated options: everything a child spawner is configured from."""

    profile: str
    backend: str
    gpus: int
    cpus: int
    memory_gb: int
    walltime_s: int
    image: str = ""  # key in the profile's image list
    image_ref: str = ""  # the admin's reference for that key

    def to_state(self) -> dict:
        return asdict(self)

    def as_user_options(self) -> dict:
        """The canonical user_options for this placement (what the hub stores)."""
        opts = {"profile": self.profile, "gpus": self.gpus, "cpus": self.cpus,
                "memory_gb": self.memory_gb, "walltime": format_walltime(self.walltime_s)}
        if self.image:
            opts["image"] = self.image
        return opts


def options_from_form(formdata: Mapping[str, Sequence[str]]) -> dict:
    """Form fields -> user_options. Each profile's inputs are named ``SLUG--KEY`` so the form
    works without JavaScript; only the chosen profile's inputs are kept. Shape only: every
    value is still checked by validate_options."""
    def one(name: str) -> str | None:
        vals = formdata.get(name)
        if not vals:
            return None
        if len(vals) != 1:
            raise OptionsError(name, "given more than once")
        return vals[0]

    opts: dict = {}
    profile = one("profile")
    if profile is not None:
        opts["profile"] = profile
        for key in OPTION_KEYS[1:]:
            value = one(f"{profile}--{key}")
            if value not in (None, ""):
                opts[key] = value
    return opts


def validate_options(
    user_options: Mapping,
    profiles: Sequence[Profile],
    username: str,
    groups: Sequence[str] = (),
    admin: bool = False,
) -> Placement:
    """Check ``user_options`` for ``username``; returns a Placement or raises OptionsError."""
    if not isinstance(user_options, Mapping):
        raise OptionsError("user_options", "must be a JSON object")
    unknown = [k for k in user_options if k not in OPTION_KEYS]
    if unknown:
        raise OptionsError(str(unknown[0])[:64],
                           f"unknown option; allowed: {', '.join(OPTION_KEYS)}")
    visible = [p for p in profiles if p.visible_to(username, groups, admin)]
    if not visible:
        raise OptionsError("profile", f"no profile is available to user {username!r}")
    if "profile" not in user_options:
        profile = next((p for p in visible if p.default), visible[0])
    else:
        slug = user_options["profile"]
        profile = next((p for p in visible if isinstance(slug, str) and p.slug == slug), None)
        if profile is None:
            allowed = ", ".join(p.slug for p in visible)
            raise OptionsError("profile", f"{_show(slug)} is not a profile you may use; "
                                          f"allowed: {allowed}")
    if profile.backend == "slurm" and not UNIX_USERNAME.fullmatch(username):
        raise OptionsError("username", f"{_show(username)} cannot be used as a Unix account on "
                                       "the cluster (allowed: a-z 0-9 _ . -, starting with a "
                                       "letter or _, at most 32)")
    c = profile.choices
    gpus = _bounded(user_options, "gpus", c.gpus, profile)
    cpus = _bounded(user_options, "cpus", c.cpus, profile)
    memory = _bounded(user_options, "memory_gb", c.memory_gb, profile, " GiB")
    walltime = _walltime(user_options.get("walltime", _ABSENT), c.walltime, profile)
    image, image_ref = "", ""
    if c.images:
        image = user_options.get("image", c.default_image)
        if not isinstance(image, str) or image not in c.images:
            raise OptionsError("image", f"{_show(image)} is not offered by profile "
                                        f"{profile.slug!r}; allowed: {', '.join(c.images)}")
        image_ref = c.images[image]
    elif "image" in user_options:
        raise OptionsError("image", f"profile {profile.slug!r} offers no image choice")
    return Placement(profile.slug, profile.backend, gpus, cpus, memory, walltime, image,
                     image_ref)


def _bounded(opts: Mapping, key: str, bounds: IntRange, profile: Profile, unit: str = "") -> int:
    if key not in opts:
        return bounds.default
    value = opts[key]
    if isinstance(value, str) and _INT.fullmatch(value.strip()):
        value = int(value.strip())
    if not isinstance(value, int) or isinstance(value, bool):
        raise OptionsError(key, f"{_show(value)} is not a whole number; allowed for profile "
                                f"{profile.slug!r}: {bounds.describe(unit)}")
    if not bounds.min <= value <= bounds.max:
        raise OptionsError(key, f"{value} is outside what profile {profile.slug!r} allows: "
                                f"{bounds.describe(unit)}")
    return value


def _walltime(value, bounds: IntRange, profile: Profile) -> int:
    """The user's walltime as Slurm reads it (a number is minutes, as in ``sbatch --time``).

    The form offers HH:MM:SS; a two-field A:B is refused with both readings, since Slurm
    reads it as MM:SS where people often mean HH:MM (earlier aifab read it so).
    """
    allowed = (f"{format_walltime(bounds.min)} to {format_walltime(bounds.max)} "
               f"(default {format_walltime(bounds.default)})")
    if value is _ABSENT:
        return bounds.default
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise OptionsError("walltime", f"{_show(value)} is not a walltime; write HH:MM:SS or "
                                       f"a number of minutes; allowed: {allowed}")
    if is_ambiguous(value):
        raise OptionsError("walltime", f"{_show(value)} is ambiguous: {readings(value)}; "
                                       f"allowed for profile {profile.slug!r}: {allowed}")
    try:
        seconds = parse_walltime(value.strip() if isinstance(value, str) else value)
    except ValueError:
        raise OptionsError("walltime", f"{_show(value)} is not a walltime like 01:30:00 (or a "
                                       f"number of minutes); allowed for profile "
                                       f"{profile.slug!r}: {allowed}") from None
    if not bounds.min <= seconds <= bounds.max:
        raise OptionsError("walltime", f"{format_walltime(seconds)} is outside what profile "
                                       f"{profile.slug!r} allows: {allowed}")
    return seconds


def _show(value) -> str:
    """A user's value, shortened and escaped, safe to put in a message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
