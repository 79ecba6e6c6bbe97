"""The INS: test vectors of DOMAIN.md 2 and properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mssante.routing.ins import Ins, InsError, InsProblem, compute_key, parse_ins, with_key

# DOMAIN.md 2: (13 characters, key)
VECTORS = [
    ("284052A321025", 52),
    ("2550814168025", 38),
    ("2940375120005", 91),
    ("1531245007231", 60),
    ("1460263220001", 96),
]


@pytest.mark.parametrize(("nir", "key"), VECTORS)
def test_domain_vectors_key(nir: str, key: int) -> None:
    assert compute_key(nir) == key
    assert parse_ins(f"{nir}{key:02d}") == Ins(f"{nir}{key:02d}")


def test_domain_example_address() -> None:
    assert parse_ins("146026322000196") == Ins("146026322000196")


def test_corsica_2b_counts_as_18() -> None:
    nir = "1850" + "1" + "2B" + "004123"
    assert compute_key(nir) == 97 - int("1850118004123") % 97
    assert parse_ins(with_key(nir)) == Ins(with_key(nir))


def test_corsica_lower_case_is_normalised() -> None:
    ins = with_key("284052A321025")
    assert parse_ins(ins.lower()) == Ins(ins)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("14602632200019", InsProblem.LENGTH),
        ("1460263220001960", InsProblem.LENGTH),
        ("", InsProblem.LENGTH),
        ("146026322000197", InsProblem.KEY),
        ("146026322000100", InsProblem.KEY),
        ("1460263220A0196", InsProblem.CHARACTERS),
        ("2A4052A32102552", InsProblem.CHARACTERS),
        ("28405 A321025x2", InsProblem.CHARACTERS),
        ("2840522C321025x", InsProblem.CHARACTERS),
        ("284052C32102552", InsProblem.DEPARTMENT),
        ("28405AB32102552", InsProblem.DEPARTMENT),
        ("14613632200019é", InsProblem.CHARACTERS),
        (with_key("5460263220001"), InsProblem.SEX),
        (with_key("1461363220001"), InsProblem.MONTH),
        (with_key("1460063220001"), InsProblem.MONTH),
        (with_key("1461963220001"), InsProblem.MONTH),
    ],
)
def test_refusals(text: str, problem: InsProblem) -> None:
    result = parse_ins(text)
    assert isinstance(result, InsError)
    assert result.problem is problem


@pytest.mark.parametrize("month", ["20", "42", "99", "01", "12"])
def test_unknown_birth_month_range_accepted(month: int) -> None:
    assert isinstance(parse_ins(with_key(f"184{month}75123456")), Ins)


# --- properties -------------------------------------------------------------------------

_months = st.one_of(st.integers(1, 12), st.integers(20, 99)).map(lambda m: f"{m:02d}")
_depts = st.one_of(st.integers(0, 99).map(lambda d: f"{d:02d}"), st.sampled_from(["2A", "2B"]))
well_formed = st.builds(
    lambda sex, yy, mm, dept, commune, order: f"{sex}{yy:02d}{mm}{dept}{commune:03d}{order:03d}",
    st.sampled_from("123478"),
    st.integers(0, 99),
    _months,
    _depts,
    st.integers(0, 999),
    st.integers(0, 999),
)


@given(well_formed)
def test_every_well_formed_number_with_its_key_is_accepted(nir: str) -> None:
    ins = with_key(nir)
    assert parse_ins(ins) == Ins(ins)
    assert 1 <= int(ins[13:]) <= 97


@given(well_formed, st.integers(0, 14), st.characters(codec="ascii"))
def test_every_single_character_change_is_refused(nir: str, pos: int, char: str) -> None:
    ins = with_key(nir)
    if ins[pos].upper() == char.upper():
        return  # not a change (the only case-insensitive spot is 2A/2B)
    changed = ins[:pos] + char + ins[pos + 1 :]
    assert isinstance(parse_ins(changed), InsError), changed
