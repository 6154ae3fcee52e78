"""The options form: plain HTML that works without JavaScript.

One radio button per profile the user may use; under each, that profile's inputs named
``SLUG--KEY`` with the limits written next to them (and as min/max, so browsers check them
too; the server checks again). A pure function of the profiles.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from aifab.walltime import format_walltime

from .profiles import IntRange, Profile

# what the walltime input lets a browser submit: HH:MM:SS, D-HH:MM:SS or minutes, never the
# two-field A:B that Slurm reads as MM:SS and people as HH:MM (the server refuses it too)
WALLTIME_PATTERN = "([0-9]+-)?[0-9]+:[0-9]{2}:[0-9]{2}|[0-9]+"
BACKEND_LABEL = {"local": "this machine", "slurm": "Slurm", "kubernetes": "Kubernetes"}


def render_form(profiles: Sequence[Profile], selected: str | None = None) -> str:
    if not profiles:
        return "<p>No profile is available to you. Ask your administrator for access.</p>"
    chosen = selected if any(p.slug == selected for p in profiles) else next(
        (p.slug for p in profiles if p.default), profiles[0].slug)
    parts = ['<div class="aifab-profiles">']
    for p in profiles:
        parts.append(_profile_block(p, p.slug == chosen))
    parts.append("</div>")
    return "\n".join(parts)


def _profile_block(p: Profile, checked: bool) -> str:
    slug = escape(p.slug)
    c = p.choices
    rows = []
    if c.gpus.max > 0:
        rows.append(_number(slug, "gpus", "GPUs", c.gpus))
    if c.cpus.max > c.cpus.min:
        rows.append(_number(slug, "cpus", "CPU cores", c.cpus))
    if c.memory_gb.max > c.memory_gb.min:
        rows.append(_number(slug, "memory_gb", "Memory (GiB)", c.memory_gb))
    if p.backend != "local" or c.walltime.max > c.walltime.min:
        wt = c.walltime
        rows.append(
            f'<label>Walltime <input name="{slug}--walltime" '
            f'value="{format_walltime(wt.default)}" pattern="{WALLTIME_PATTERN}" '
            f'title="HH:MM:SS, D-HH:MM:SS or a number of minutes" size="10"> '
            f'<small>up to {format_walltime(wt.max)} (HH:MM:SS)</small></label>'
        )
    if c.images:
        opts = "".join(
            f'<option value="{escape(k)}"{" selected" if k == c.default_image else ""}>'
            f"{escape(k)}</option>"
            for k in c.images
        )
        rows.append(f'<label>Environment <select name="{slug}--image">{opts}</select></label>')
    body = "".join(f'<div class="form-group">{r}</div>' for r in rows)
    return (
        f'<fieldset class="aifab-profile" style="margin-bottom:1em">'
        f'<label><input type="radio" name="profile" value="{slug}"'
        f'{" checked" if checked else ""}> <strong>{escape(p.display_name)}</strong> '
        f"<small>({BACKEND_LABEL[p.backend]})</small></label>"
        f'<p class="help-block">{escape(p.description)}</p>{body}</fieldset>'
    )


def _number(slug: str, key: str, label: str, r: IntRange) -> str:
    return (
        f'<label>{label} <input type="number" name="{slug}--{key}" value="{r.default}" '
        f'min="{r.min}" max="{r.max}" step="1"> <small>{r.min}–{r.max}</small></label>'
    )
