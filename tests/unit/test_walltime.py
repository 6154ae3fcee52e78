"""aifab.walltime: every spelling as Slurm reads it, and what is refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aifab.walltime import format_walltime, is_ambiguous, parse_walltime, readings


@pytest.mark.parametrize("value, seconds", [
    ("90", 90 * 60),                   # MM
    (90, 90 * 60),                     # an int is minutes, as in --time=90
    ("5", 300),
    ("01:30", 90),                     # MM:SS: 1 min 30 s, not 1 h 30 min
    ("90:00", 90 * 60),                # MM:SS with minutes over 59
    ("01:30:00", 5400),                # HH:MM:SS
    ("100:00:00", 100 * 3600),         # hours may exceed 24
    ("1-12", 36 * 3600),               # D-HH
    ("1-12:30", 36 * 3600 + 1800),     # D-HH:MM
    ("1-12:30:15", 36 * 3600 + 1815),  # D-HH:MM:SS
    ("0-00:00:01", 1),
    (" 02:00:00 ", 7200),              # surrounding blanks are not part of the value
])
def test_each_spelling_means_what_it_means_to_slurm(value, seconds):
    assert parse_walltime(value) == seconds


@pytest.mark.parametrize("value", [
    "", "x", "1 h", "1h", "-5", "+5", "1.5", "01:30:00:00", "1-", "-1", "1--2", "1-2-3",
    "01:60", "01:00:60", "1-24", "1-00:60", "0", "00:00", "00:00:00", "0-0", 0, -1, True,
    1.5, None, [90], {"max": 90}, "01:00:00\n#SBATCH --uid=0", "١٢", "99999999",
])
def test_what_is_not_a_walltime_is_refused_naming_the_value_and_the_spellings(value):
    with pytest.raises(ValueError) as exc:
        parse_walltime(value)
    assert repr(value) in str(exc.value)
    assert "HH:MM:SS" in str(exc.value) or "no limit" in str(exc.value)


def test_format_is_hh_mm_ss():
    assert format_walltime(90) == "00:01:30"
    assert format_walltime(5400) == "01:30:00"
    assert format_walltime(36 * 3600 + 1815) == "36:30:15"
    assert format_walltime(0) == "00:00:00"
    with pytest.raises(ValueError):
        format_walltime(-1)


@given(st.integers(1, 10**7))
def test_format_then_parse_round_trips(seconds):
    assert parse_walltime(format_walltime(seconds)) == seconds


@given(st.integers(0, 99), st.integers(0, 23), st.integers(0, 59), st.integers(0, 59))
def test_the_day_spellings_agree_with_hh_mm_ss(d, h, m, s):
    total = ((d * 24 + h) * 60 + m) * 60 + s
    if total:
        assert parse_walltime(f"{d}-{h:02d}:{m:02d}:{s:02d}") == total
        assert parse_walltime(format_walltime(total)) == total
    if d * 24 + h:
        assert parse_walltime(f"{d}-{h}") == (d * 24 + h) * 3600


def test_only_the_two_field_spelling_is_ambiguous():
    assert is_ambiguous("01:30") and is_ambiguous(" 1:30 ")
    for value in ("90", 90, "01:30:00", "1-12", "1-12:30", "x", None):
        assert not is_ambiguous(value)


def test_readings_give_both_meanings():
    r = readings("01:30")
    assert (r.slurm_s, r.hours_minutes_s) == (90, 5400)
    assert str(r).startswith("01:30 is 1 min 30 s to Slurm (MM:SS); "
                             "if you meant 1 h 30 min write 01:30:00")
    assert readings("12:00").message.startswith("12:00 is 12 min to Slurm")
    with pytest.raises(ValueError, match="not a two-field"):
        readings("01:30:00")


def test_aifab_cluster_reads_walltimes_as_slurm_does():
    from aifab.magics.dask_cluster import ClusterOptionError
    from aifab.magics.dask_cluster import parse_walltime as cluster_walltime

    assert cluster_walltime("01:30") == 90  # 1 min 30 s, as sbatch --time reads it
    assert cluster_walltime(90) == 90 * 60 and cluster_walltime("90") == 90 * 60
    assert cluster_walltime("1-00:00:00") == 86400
    with pytest.raises(ClusterOptionError, match="less than a minute"):
        cluster_walltime("00:30")
