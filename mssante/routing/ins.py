"""The matricule INS: the 15-character local part of a patient address.

DOMAIN.md 2: 13 characters of NIR or NIA followed by a 2-digit key.

    sex (1) | birth year (2) | birth month (2) | department (2) | commune (3) | order (3) | key (2)

- birth month is 01-12, or 20-99 when the month is unknown;
- the department is two digits, or ``2A``/``2B`` for Corsica: only
  positions 6-7 (1-based) may hold letters;
- key = 97 - (13-digit number mod 97); for Corsica ``2A`` counts as ``19``
  and ``2B`` as ``18``.

The module is pure: no I/O, no clock.  It answers with a value
(:class:`Ins` or :class:`InsError`), never with an exception, so routing can
turn the answer into a verdict.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

INS_LENGTH = 15

# DOMAIN.md 2: 2A counts as 19, 2B as 18 in the key computation.
_CORSICA = {"2A": "19", "2B": "18"}


class InsProblem(enum.Enum):
    """Why a string is not a valid INS (kept apart so logs say which check failed)."""

    LENGTH = "length"
    CHARACTERS = "characters"
    SEX = "sex"
    MONTH = "month"
    DEPARTMENT = "department"
    KEY = "key"


@dataclass(frozen=True, slots=True)
class InsError:
    problem: InsProblem
    detail: str


@dataclass(frozen=True, slots=True)
class Ins:
    """A syntactically valid INS whose key matches."""

    value: str

    @property
    def nir(self) -> str:
        """The 13 characters without the key."""
        return self.value[:13]

    @property
    def key(self) -> int:
        return int(self.value[13:])

    @property
    def is_corsican(self) -> bool:
        return self.value[5:7] in _CORSICA

    def __str__(self) -> str:
        return self.value


def numeric_body(nir13: str) -> int:
    """The 13 characters as the number the key is computed on (Corsica rule applied)."""
    dept = nir13[5:7].upper()
    if dept in _CORSICA:
        nir13 = nir13[:5] + _CORSICA[dept] + nir13[7:]
    return int(nir13)


def compute_key(nir13: str) -> int:
    """DOMAIN.md 2: key = 97 - (number mod 97), always in 1..97."""
    return 97 - numeric_body(nir13) % 97


def parse_ins(text: str) -> Ins | InsError:
    """Check layout, month, Corsica and key; return the normalised INS or why it is not one.

    Letters are accepted in either case (``2a`` is ``2A``); the value returned
    is upper-case so it can be compared and looked up as is.
    """
    if len(text) != INS_LENGTH:
        return InsError(InsProblem.LENGTH, f"{len(text)} characters, expected {INS_LENGTH}")
    value = text.upper()
    if not value.isascii():
        return InsError(InsProblem.CHARACTERS, "non-ASCII character")
    dept = value[5:7]
    rest = value[:5] + value[7:]
    if not rest.isdigit():
        return InsError(InsProblem.CHARACTERS, "letters are allowed only in positions 6-7")
    if not (dept.isdigit() or dept in _CORSICA):
        return InsError(InsProblem.DEPARTMENT, "department must be two digits, 2A or 2B")
    # NIR: 1 man, 2 woman; NIA and provisional numbers use 3, 4, 7 and 8.
    if value[0] not in "123478":
        return InsError(InsProblem.SEX, "first digit must be 1, 2, 3, 4, 7 or 8")
    month = int(value[3:5])
    if not (1 <= month <= 12 or 20 <= month <= 99):
        return InsError(InsProblem.MONTH, "birth month must be 01-12 or 20-99")
    expected = compute_key(value[:13])
    if int(value[13:]) != expected:
        return InsError(InsProblem.KEY, "key does not match")
    return Ins(value)


def with_key(nir13: str) -> str:
    """The full 15-character INS for 13 characters (demo data, tests, tools)."""
    return f"{nir13}{compute_key(nir13):02d}"
