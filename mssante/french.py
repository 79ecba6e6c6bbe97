"""Dates as a French reader expects them, in Paris time: "1er décembre 2026 à 09 h 05"."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

PARIS = ZoneInfo("Europe/Paris")

_MONTHS = (
    "janvier",
    "février",
    "mars",
    "avril",
    "mai",
    "juin",
    "juillet",
    "août",
    "septembre",
    "octobre",
    "novembre",
    "décembre",
)


def french_date(d: dt.date) -> str:
    """A day; an aware datetime is first taken in Paris time."""
    if isinstance(d, dt.datetime):
        d = d.astimezone(PARIS).date()
    day = "1er" if d.day == 1 else str(d.day)
    return f"{day} {_MONTHS[d.month - 1]} {d.year}"


def french_datetime(at: dt.datetime) -> str:
    local = at.astimezone(PARIS)
    return f"{french_date(local.date())} à {local:%H} h {local:%M}"
