"""Walltimes, with Slurm's meaning of every spelling. Pure; the only parser in the project.

Slurm (``sbatch --time``) reads::

    MM              90          90 minutes (an int is minutes too)
    MM:SS           01:30       1 minute 30 seconds  (not 1 h 30 min!)
    HH:MM:SS        01:30:00    1 hour 30 minutes
    D-HH            1-12        1 day 12 hours
    D-HH:MM         1-12:30     1 day 12 hours 30 minutes
    D-HH:MM:SS      1-12:30:15

The two-field ``A:B`` is the one people misread (they mean hours:minutes), so it is
:func:`is_ambiguous`, and :func:`readings` says both meanings for a message.
:func:`format_walltime` always writes ``HH:MM:SS`` (hours may exceed 24), which no one
misreads and every Slurm version accepts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SPELLINGS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (e.g. 90, 01:30:00, 1-12)"

# the first field of each spelling is unbounded (Slurm reads 90:00 as 90 minutes); the
# others are clock fields (minutes, seconds < 60; hours after a day < 24)
_FIRST = r"([0-9]{1,7})"
_CLOCK = r"([0-9]{1,2})"
_FORMS = (
    # (regex, units of each group in seconds, max of each group after the first)
    (re.compile(rf"{_FIRST}"), (60,), ()),
    (re.compile(rf"{_FIRST}:{_CLOCK}"), (60, 1), (59,)),
    (re.compile(rf"{_FIRST}:{_CLOCK}:{_CLOCK}"), (3600, 60, 1), (59, 59)),
    (re.compile(rf"{_FIRST}-{_CLOCK}"), (86400, 3600), (23,)),
    (re.compile(rf"{_FIRST}-{_CLOCK}:{_CLOCK}"), (86400, 3600, 60), (23, 59)),
    (re.compile(rf"{_FIRST}-{_CLOCK}:{_CLOCK}:{_CLOCK}"), (86400, 3600, 60, 1), (23, 59, 59)),
)
_TWO_FIELDS = _FORMS[1][0]


def parse_walltime(value) -> int:
    """A walltime as Slurm reads it -> seconds (> 0). An int is minutes, as in ``--time``.

    ValueError, naming the value and the allowed spellings, for anything else (including
    0, which Slurm reads as "no limit", and values with spaces inside or a sign).
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{value!r} is not a walltime; write {SPELLINGS}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"walltime {value!r} must be at least 1 minute; "
                             f"write {SPELLINGS}")
        return value * 60
    text = value.strip()
    for regex, units, maxima in _FORMS:
        m = regex.fullmatch(text)
        if m is None:
            continue
        fields = [int(g) for g in m.groups()]
        for got, most in zip(fields[1:], maxima, strict=True):
            if got > most:
                raise ValueError(f"walltime {value!r}: a field is {got}, over {most}; "
                                 f"write {SPELLINGS}")
        seconds = sum(f * u for f, u in zip(fields, units, strict=True))
        if seconds <= 0:
            raise ValueError(f"walltime {value!r} is zero, which Slurm reads as no limit; "
                             f"write {SPELLINGS}")
        return seconds
    raise ValueError(f"{value!r} is not a walltime; write {SPELLINGS}")


def format_walltime(seconds: int) -> str:
    """Seconds -> ``HH:MM:SS`` (what ``--time`` gets; hours may exceed 24)."""
    seconds = int(seconds)
    if seconds < 0:
        raise ValueError(f"a walltime cannot be negative: {seconds}")
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def is_ambiguous(value) -> bool:
    """Whether ``value`` is the two-field ``A:B`` that Slurm reads as minutes:seconds and
    people often mean as hours:minutes."""
    return isinstance(value, str) and _TWO_FIELDS.fullmatch(value.strip()) is not None


@dataclass(frozen=True)
class Readings:
    """The two meanings of an ``A:B`` walltime."""

    value: str
    slurm_s: int  # minutes:seconds, as Slurm reads it
    hours_minutes_s: int  # hours:minutes, as people often mean it

    @property
    def message(self) -> str:
        return (f"{self.value} is {_human(self.slurm_s)} to Slurm (MM:SS); if you meant "
                f"{_human(self.hours_minutes_s)} write {format_walltime(self.hours_minutes_s)}"
                f", if you meant {_human(self.slurm_s)} write {format_walltime(self.slurm_s)}")

    def __str__(self) -> str:
        return self.message


def readings(value: str) -> Readings:
    """Both meanings of an ambiguous ``A:B`` walltime; ValueError if it is not one."""
    if not is_ambiguous(value):
        raise ValueError(f"{value!r} is not a two-field A:B walltime")
    a, b = (int(x) for x in value.strip().split(":"))
    return Readings(value.strip(), a * 60 + b, a * 3600 + b * 60)


def _human(seconds: int) -> str:
    """3723 -> '1 h 2 min 3 s'."""
    parts = []
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    for n, unit in ((days, "d"), (hours, "h"), (minutes, "min"), (secs, "s")):
        if n:
            parts.append(f"{n} {unit}")
    return " ".join(parts) or "0 s"
