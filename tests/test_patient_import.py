"""Importing the patient directory from CSV and JSON Lines, against each real database.

The tests that touch the database take the ``db_url`` fixture (tests/conftest.py):
they run on SQLite in the test's data directory and on a fresh PostgreSQL database.
"""

from __future__ import annotations

import csv
import json
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from email_validator import EmailNotValidError, validate_email
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from mssante.routing.ins import with_key
from mssante.store import audit
from mssante.store.db import create_schema, is_sqlite, make_engine, make_sessionmaker
from mssante.store.models import AuditEvent, LinkRole, Patient, PatientLink, ProfileStatus
from mssante.store.patient_import import (
    FIELDS,
    ImportReport,
    RowError,
    _EmailCheck,
    _RowParser,
    _staged,
    import_patients,
)
from tests.conftest import FakeClock

Sessions = async_sessionmaker[AsyncSession]


def ins(n: int, *, yy: int = 85, mm: int = 1) -> str:
    return with_key(f"1{yy:02d}{mm:02d}75{n:06d}")


def corsican(n: int) -> str:
    return with_key(f"284052A{n:06d}")


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(db_url, writer=True)
    await create_schema(engine)
    yield engine
    await engine.dispose()


@pytest.fixture
def sessions(engine: AsyncEngine) -> Sessions:
    return make_sessionmaker(engine)


def write_csv(
    path: Path, rows: Iterable[Mapping[str, str]], fields: Iterable[str] = FIELDS
) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any] | str]) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
        encoding="utf-8",
    )
    return path


async def patients(sessions: Sessions) -> dict[str, Patient]:
    async with sessions() as session:
        return {p.ins: p for p in await session.scalars(select(Patient))}


async def links(sessions: Sessions) -> set[tuple[str, str, LinkRole]]:
    """(patient INS, adult INS, role) for every link."""
    async with sessions() as session:
        by_id = {p.id: p.ins for p in await session.scalars(select(Patient))}
        return {
            (by_id[link.patient_id], by_id[link.adult_id], link.role)
            for link in await session.scalars(select(PatientLink))
        }


async def events(sessions: Sessions, kind: str | None = None) -> list[AuditEvent]:
    async with sessions() as session:
        query = select(AuditEvent).order_by(AuditEvent.id)
        all_events = list(await session.scalars(query))
    return [e for e in all_events if kind is None or e.kind == kind]


async def count(sessions: Sessions, model: type[Any]) -> int:
    async with sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


MOTHER, FATHER, CHILD, AUNT = ins(1), ins(2), ins(3, yy=15), ins(4)


def family() -> list[dict[str, str]]:
    return [
        {
            "ins": MOTHER,
            "status": "activated",
            "activation_email": "marie@example.fr",
            "given_name": "Marie",
            "family_name": "Martin",
            "birth_date": "1985-01-12",
            "postal_address": "12 rue des Lilas | 75011 Paris",
        },
        {
            "ins": FATHER,
            "status": "created",
            "insurer_email": "Paul@Example.FR",
            "postal_address": r"3 allée Verte\n69001 Lyon",
        },
        {
            "ins": CHILD,
            "status": "created",
            "representatives": f"{MOTHER}; {FATHER}",
            "helpers": AUNT,
        },
        {"ins": AUNT, "status": "opposed"},
    ]


async def test_csv_import_creates_patients_and_links(
    sessions: Sessions, clock: FakeClock, tmp_path: Path
) -> None:
    report = await import_patients(sessions, write_csv(tmp_path / "p.csv", family()), clock=clock)
    assert report == ImportReport(
        rows=4, created=4, updated=0, unchanged=0, errors=[], imported=True
    )

    found = await patients(sessions)
    mother = found[MOTHER]
    assert mother.status is ProfileStatus.ACTIVATED
    assert mother.activation_email == "marie@example.fr"
    assert (mother.given_name, mother.family_name) == ("Marie", "Martin")
    assert mother.birth_date == date(1985, 1, 12)
    assert mother.postal_address == "12 rue des Lilas\n75011 Paris"
    assert mother.created_at == mother.updated_at == mother.activated_at == clock.now()
    father = found[FATHER]
    assert father.insurer_email == "Paul@example.fr"  # email_validator's normal form
    assert father.postal_address == "3 allée Verte\n69001 Lyon"
    assert father.activated_at is None
    assert found[CHILD].given_name is None
    assert await links(sessions) == {
        (CHILD, MOTHER, LinkRole.REPRESENTATIVE),
        (CHILD, FATHER, LinkRole.REPRESENTATIVE),
        (CHILD, AUNT, LinkRole.HELPER),
    }
    [event] = await events(sessions)
    assert (event.kind, event.actor) == ("patients.imported", "cli")
    assert event.details == {"created": 4, "updated": 0, "unchanged": 0}


async def test_jsonl_import(sessions: Sessions, clock: FakeClock, tmp_path: Path) -> None:
    rows: list[dict[str, Any] | str] = [
        {
            "ins": MOTHER,
            "status": "activated",
            "activation_email": "marie@example.fr",
            "postal_address": ["12 rue des Lilas", "", "75011 Paris"],
            "birth_date": None,
        },
        "",  # blank lines are allowed
        {"ins": CHILD, "status": "created", "representatives": [MOTHER], "helpers": []},
        {"ins": FATHER, "status": "closed", "postal_address": "1 rue Haute\n75001 Paris"},
    ]
    for name in ("p.jsonl", "p.ndjson"):
        report = await import_patients(sessions, write_jsonl(tmp_path / name, rows), clock=clock)
        assert report.errors == []
        assert report.rows == 3
    found = await patients(sessions)
    assert found[MOTHER].postal_address == "12 rue des Lilas\n75011 Paris"
    assert found[FATHER].postal_address == "1 rue Haute\n75001 Paris"
    assert found[FATHER].status is ProfileStatus.CLOSED
    assert await links(sessions) == {(CHILD, MOTHER, LinkRole.REPRESENTATIVE)}

    # An explicit format wins over the extension.
    other = write_jsonl(tmp_path / "export.txt", [{"ins": AUNT, "status": "created"}])
    report = await import_patients(sessions, other, clock=clock, fmt="jsonl")
    assert report.created == 1
    with pytest.raises(ValueError, match="extension"):
        await import_patients(sessions, other, clock=clock)


async def test_every_csv_error_is_reported_with_its_line(
    sessions: Sessions, clock: FakeClock, tmp_path: Path
) -> None:
    good = ins(10)
    bad_key = good[:13] + f"{(int(good[13:]) % 97) + 1:02d}"
    month_13 = with_key("1851375000011")  # the key matches, the month cannot
    wrong_corsica = "18501752A100012"  # 2A in the commune, not the department
    rows = [
        {
            "ins": good,
            "status": "created",
            "postal_address": "line one\nline two",
        },  # lines 2-3: a quoted line break
        {"ins": bad_key, "status": "created"},  # 4
        {"ins": month_13, "status": "created"},  # 5
        {"ins": wrong_corsica, "status": "created"},  # 6
        {"ins": ins(13), "status": "created", "insurer_email": "no-at-sign"},  # 7
        {"ins": ins(14), "status": "foo"},  # 8
        {"ins": good, "status": "opposed"},  # 9: duplicate of line 2
        {"ins": ins(15), "status": "created", "representatives": ins(99)},  # 10
        {"ins": ins(16), "status": "activated", "insurer_email": "a@example.fr"},  # 11
        {"ins": ins(17), "status": "created", "representatives": ins(17)},  # 12
        {"ins": ins(18), "status": "created", "birth_date": "12/01/1985"},  # 13
        {"ins": "", "status": ""},  # 14
        {"ins": corsican(19), "status": "created", "helpers": "not-an-ins"},  # 15
        {"ins": ins(20), "status": "created", "representatives": ins(14)},  # 16: line 8 bad
    ]
    path = write_csv(tmp_path / "p.csv", rows)
    with path.open("a", encoding="utf-8") as fh:
        fh.write("\n")  # 17: blank, ignored
        fh.write(f"{ins(21)},created,extra\n")  # 18: wrong number of fields

    report = await import_patients(sessions, path, clock=clock)

    assert report.imported is False
    assert report.rows == 15
    assert (report.created, report.updated, report.unchanged) == (0, 0, 0)
    assert report.errors == [
        RowError(4, "ins: key does not match"),
        RowError(5, "ins: birth month must be 01-12 or 20-99"),
        RowError(6, "ins: letters are allowed only in positions 6-7"),
        RowError(7, "insurer_email: An email address must have an @-sign."),
        RowError(8, "status: 'foo' is not one of activated, created, opposed, closed"),
        RowError(9, "ins: already on line 2"),
        RowError(10, f"representatives: {ins(99)} is neither in the file nor in the directory"),
        RowError(11, "activation_email: required when status is activated"),
        RowError(12, "representatives: a patient cannot be its own representative"),
        RowError(13, "birth_date: '12/01/1985' is not a date (YYYY-MM-DD)"),
        RowError(14, "ins: required; status: required"),
        RowError(15, "helpers: 'not-an-ins' is not a valid INS (10 characters, expected 15)"),
        RowError(16, f"representatives: {ins(14)} is on line 8, which is invalid"),
        RowError(18, "3 fields, the header has 10"),
    ]
    # Nothing written, not even the valid rows, nor an audit event.
    assert await count(sessions, Patient) == 0
    assert await count(sessions, AuditEvent) == 0


async def test_unknown_csv_column_is_reported_on_the_header(
    sessions: Sessions, clock: FakeClock, tmp_path: Path
) -> None:
    path = write_csv(
        tmp_path / "p.csv",
        [{"ins": ins(1), "status": "created", "nickname": "x"}],
        fields=["ins", "status", "nickname"],
    )
    for skip_invalid in (False, True):
        report = await import_patients(sessions, path, clock=clock, skip_invalid=skip_invalid)
        assert report.errors == [RowError(1, "unknown column 'nickname'")]
        assert report.imported is False
    path = write_csv(tmp_path / "q.csv", [{"ins": ins(1)}], fields=["ins"])
    report = await import_patients(sessions, path, clock=clock)
    assert report.errors == [RowError(1, "missing column 'status'")]
    assert await count(sessions, Patient) == 0


async def test_jsonl_errors(sessions: Sessions, clock: FakeClock, tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"ins": ins(1), "status": "created"},  # 1
            {"ins": ins(2), "status": "created", "nickname": "x"},  # 2
            "{not json",  # 3
            "",  # 4
            "[1, 2]",  # 5
            {"ins": int(ins(3)), "status": "created"},  # 6
            {"ins": ins(4), "status": "created", "representatives": ins(1)},  # 7: not a list
            {"ins": ins(5), "status": "created", "postal_address": 12},  # 8
        ],
    )
    with path.open("ab") as fh:
        fh.write(
            b'{"ins": "' + ins(6).encode() + b'", "status": "created", "family_name": "Ren\xe9"}\n'
        )  # 9: Latin-1, not UTF-8
    report = await import_patients(sessions, path, clock=clock)
    assert report.errors == [
        RowError(2, "unknown key 'nickname'"),
        RowError(3, "not valid JSON (Expecting property name enclosed in double quotes)"),
        RowError(5, "not a JSON object"),
        RowError(6, "ins: must be a string"),
        RowError(7, "representatives: must be a list of INS"),
        RowError(8, "postal_address: must be a string or a list of strings"),
        RowError(9, "not valid UTF-8"),
    ]
    assert report.rows == 8
    assert await count(sessions, Patient) == 0


async def test_unclosed_quote_is_a_row_error(
    sessions: Sessions, clock: FakeClock, tmp_path: Path
) -> None:
    path = tmp_path / "p.csv"
    path.write_text(
        "ins,status,given_name\n"
        f'{ins(1)},created,"{"x" * 200_000}\n'  # line 2: the quote never closes
        f"{ins(2)},created,Anne\n",
        encoding="utf-8",
    )
    report = await import_patients(sessions, path, clock=clock)
    assert report.errors == [
        RowError(2, "not readable as CSV (field larger than field limit (131072))")
    ]


async def test_skip_invalid_imports_the_valid_rows(
    sessions: Sessions, clock: FakeClock, tmp_path: Path
) -> None:
    rows = [
        {"ins": ins(1), "status": "created"},  # 2
        {"ins": ins(2), "status": "activated"},  # 3: no activation e-mail
        {"ins": ins(3), "status": "created", "representatives": ins(4)},  # 4: its adult is bad
        {"ins": ins(4), "status": "created", "helpers": ins(99)},  # 5: unknown helper
        {"ins": ins(5), "status": "created", "representatives": ins(1)},  # 6
    ]
    report = await import_patients(
        sessions, write_csv(tmp_path / "p.csv", rows), clock=clock, skip_invalid=True
    )
    assert report.imported is True
    assert (report.rows, report.created, report.updated, report.unchanged) == (5, 2, 0, 0)
    assert [e.line for e in report.errors] == [3, 4, 5]
    # Line 4 is valid on its own but names line 5, found invalid only at the end.
    assert report.errors[1].reason == f"representatives: {ins(4)} is on line 5, which is invalid"
    assert set(await patients(sessions)) == {ins(1), ins(5)}
    assert await links(sessions) == {(ins(5), ins(1), LinkRole.REPRESENTATIVE)}


async def test_skip_invalid_with_only_invalid_rows_imports_nothing(
    sessions: Sessions, clock: FakeClock, tmp_path: Path
) -> None:
    path = write_csv(tmp_path / "p.csv", [{"ins": ins(1), "status": "nope"}])
    report = await import_patients(sessions, path, clock=clock, skip_invalid=True)
    assert report.imported is False
    assert await count(sessions, AuditEvent) == 0


async def test_import_twice_changes_nothing(
    sessions: Sessions, clock: FakeClock, tmp_path: Path
) -> None:
    path = write_csv(tmp_path / "p.csv", family())
    first = await import_patients(sessions, path, clock=clock)
    assert first.created == 4
    before = await patients(sessions)
    clock.advance(days=1)

    second = await import_patients(sessions, path, clock=clock, batch_size=3)

    assert (second.created, second.updated, second.unchanged) == (0, 0, 4)
    assert await count(sessions, Patient) == 4
    assert await count(sessions, PatientLink) == 3
    after = await patients(sessions)
    assert {k: p.updated_at for k, p in after.items()} == {
        k: p.updated_at for k, p in before.items()
    }
    assert [e.details for e in await events(sessions, "patients.imported")] == [
        {"created": 4, "updated": 0, "unchanged": 0},
        {"created": 0, "updated": 0, "unchanged": 3},
        {"created": 0, "updated": 0, "unchanged": 1},
    ]


async def test_status_change_is_audited(
    sessions: Sessions, clock: FakeClock, tmp_path: Path
) -> None:
    rows = [
        {"ins": ins(1), "status": "created", "insurer_email": "a@example.fr"},
        {"ins": ins(2), "status": "created"},
    ]
    await import_patients(sessions, write_csv(tmp_path / "a.csv", rows), clock=clock)
    created_at = clock.now()
    clock.advance(hours=2)
    rows[0] |= {"status": "activated", "activation_email": "a@example.org"}
    rows[1] |= {"given_name": "Jeanne"}

    report = await import_patients(
        sessions, write_csv(tmp_path / "b.csv", rows), clock=clock, actor="admin:alice"
    )

    assert (report.created, report.updated, report.unchanged) == (0, 2, 0)
    found = await patients(sessions)
    activated = found[ins(1)]
    assert activated.status is ProfileStatus.ACTIVATED
    assert activated.activation_email == "a@example.org"
    assert activated.created_at == created_at
    assert activated.updated_at == activated.activated_at == clock.now()
    assert found[ins(2)].given_name == "Jeanne"
    [change] = await events(sessions, "patient.status_changed")
    assert change.patient_id == activated.id
    assert change.actor == "admin:alice"
    assert change.details == {"from": "created", "to": "activated"}
    assert change.occurred_at == clock.now()

    # Going back to "created" keeps the first activation date.
    rows[0]["status"] = "created"
    clock.advance(hours=1)
    await import_patients(sessions, write_csv(tmp_path / "c.csv", rows), clock=clock)
    again = (await patients(sessions))[ins(1)]
    assert again.activated_at == activated.activated_at
    assert [e.details["to"] for e in await events(sessions, "patient.status_changed")] == [
        "activated",
        "created",
    ]


async def test_representatives_later_in_the_file(
    sessions: Sessions, clock: FakeClock, tmp_path: Path
) -> None:
    rows = list(reversed(family()))  # the child comes before its parents
    rows.insert(
        0, {"ins": ins(30, yy=16), "status": "created", "representatives": MOTHER, "helpers": CHILD}
    )
    # One row per batch: the adults are in later transactions.
    report = await import_patients(
        sessions, write_csv(tmp_path / "p.csv", rows), clock=clock, batch_size=1
    )
    assert report.errors == []
    assert report.created == 5
    assert await links(sessions) == {
        (CHILD, MOTHER, LinkRole.REPRESENTATIVE),
        (CHILD, FATHER, LinkRole.REPRESENTATIVE),
        (CHILD, AUNT, LinkRole.HELPER),
        (ins(30, yy=16), MOTHER, LinkRole.REPRESENTATIVE),
        (ins(30, yy=16), CHILD, LinkRole.HELPER),
    }
    assert len(await events(sessions, "patients.imported")) == 5


async def test_links_become_those_of_the_file(
    sessions: Sessions, clock: FakeClock, tmp_path: Path
) -> None:
    await import_patients(sessions, write_csv(tmp_path / "a.csv", family()), clock=clock)
    # A later file names an adult already in the directory but not in the file,
    # swaps a role and drops a link.
    rows = [{"ins": CHILD, "status": "created", "representatives": AUNT, "helpers": MOTHER}]
    report = await import_patients(sessions, write_csv(tmp_path / "b.csv", rows), clock=clock)
    assert (report.updated, report.errors) == (1, [])
    assert await links(sessions) == {
        (CHILD, AUNT, LinkRole.REPRESENTATIVE),
        (CHILD, MOTHER, LinkRole.HELPER),
    }
    rows[0] |= {"representatives": "", "helpers": ""}
    report = await import_patients(sessions, write_csv(tmp_path / "c.csv", rows), clock=clock)
    assert report.updated == 1
    assert await links(sessions) == set()


async def test_adults_already_in_the_directory(
    sessions: Sessions, clock: FakeClock, tmp_path: Path
) -> None:
    await import_patients(sessions, write_csv(tmp_path / "a.csv", family()), clock=clock)
    rows = [
        {"ins": ins(n, yy=16), "status": "created", "representatives": f"{MOTHER};{FATHER}"}
        for n in range(40, 45)
    ]
    # batch_size=1: the references are looked up in the database while reading.
    report = await import_patients(
        sessions, write_csv(tmp_path / "b.csv", rows), clock=clock, batch_size=1
    )
    assert (report.created, report.errors) == (5, [])
    assert await count(sessions, PatientLink) == 3 + 10


async def test_skip_invalid_links_to_the_directory_version(
    sessions: Sessions, clock: FakeClock, tmp_path: Path
) -> None:
    """An adult whose new row is invalid is still the one already in the directory."""
    await import_patients(sessions, write_csv(tmp_path / "a.csv", family()), clock=clock)
    rows = [
        {"ins": MOTHER, "status": "activated"},  # no activation e-mail
        {"ins": ins(50, yy=16), "status": "created", "representatives": MOTHER},
    ]
    report = await import_patients(
        sessions, write_csv(tmp_path / "b.csv", rows), clock=clock, skip_invalid=True
    )
    assert [e.line for e in report.errors] == [2]
    assert report.created == 1
    assert (ins(50, yy=16), MOTHER, LinkRole.REPRESENTATIVE) in await links(sessions)
    assert (await patients(sessions))[MOTHER].activation_email == "marie@example.fr"


async def test_csv_with_bom_and_a_latin1_row(
    sessions: Sessions, clock: FakeClock, tmp_path: Path
) -> None:
    path = tmp_path / "p.csv"
    path.write_bytes(
        b"\xef\xbb\xbfINS,Status,family_name\r\n"
        + f"{ins(1)},created,Durand\r\n".encode()
        + f"{ins(2)},created,".encode()
        + b'"Ren\xe9\r\nLe Gall"\r\n'  # a quoted value over lines 3-4, not UTF-8
        + f"{ins(3)},Created,M\u00fcller\r\n".encode()
    )
    report = await import_patients(sessions, path, clock=clock, skip_invalid=True)
    assert report.errors == [RowError(3, "not valid UTF-8")]
    found = await patients(sessions)
    assert set(found) == {ins(1), ins(3)}
    assert found[ins(3)].family_name == "Müller"


async def test_audit_chain_verifies(sessions: Sessions, clock: FakeClock, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "a.csv", family())
    await import_patients(sessions, path, clock=clock, batch_size=2)
    rows = family()
    for row in rows:
        row["status"] = "closed"
    clock.advance(minutes=5)
    await import_patients(sessions, write_csv(tmp_path / "b.csv", rows), clock=clock, batch_size=3)
    all_events = await events(sessions)
    assert [e.kind for e in all_events].count("patient.status_changed") == 4
    assert len(all_events) == 2 + 4 + 2
    assert audit.verify_chain(all_events) == []


async def test_database_error_keeps_committed_batches(
    db_url: str, engine: AsyncEngine, sessions: Sessions, clock: FakeClock, tmp_path: Path
) -> None:
    poisoned = ins(3)
    async with engine.begin() as conn:
        if is_sqlite(db_url):
            await conn.execute(
                text(
                    "CREATE TRIGGER refuse BEFORE INSERT ON patients "
                    f"WHEN NEW.ins = '{poisoned}' BEGIN SELECT RAISE(ABORT, 'refused'); END"
                )
            )
        else:
            # One statement per execute: asyncpg prepares each one.
            await conn.execute(
                text(
                    "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                    f"IF NEW.ins = '{poisoned}' THEN RAISE EXCEPTION 'refused'; END IF; "
                    "RETURN NEW; END $$"
                )
            )
            await conn.execute(
                text(
                    "CREATE TRIGGER refuse BEFORE INSERT ON patients "
                    "FOR EACH ROW EXECUTE FUNCTION refuse()"
                )
            )
    rows = [{"ins": ins(n), "status": "created"} for n in range(1, 6)]
    with pytest.raises(DBAPIError, match="refused"):
        await import_patients(
            sessions, write_csv(tmp_path / "p.csv", rows), clock=clock, batch_size=2
        )
    assert set(await patients(sessions)) == {ins(1), ins(2)}
    assert [e.details for e in await events(sessions)] == [
        {"created": 2, "updated": 0, "unchanged": 0}
    ]


async def test_progress_adds_up_to_the_rows(
    sessions: Sessions, clock: FakeClock, tmp_path: Path
) -> None:
    rows = [{"ins": ins(n), "status": "created"} for n in range(1, 8)]
    rows.append({"ins": "bad", "status": "created"})
    calls: list[int] = []
    report = await import_patients(
        sessions,
        write_csv(tmp_path / "p.csv", rows),
        clock=clock,
        batch_size=3,
        skip_invalid=True,
        progress=calls.append,
    )
    assert sum(calls) == report.rows == 8
    assert calls == [3, 3, 2]


EMAILS = [
    "jean.dupont@example.fr",
    "Jean.Dupont@EXAMPLE.FR",
    "a+tag@sub.example.com",
    "Postmaster@example.fr",  # RFC 2142 names are lower-cased
    "élodie@exemple.fr",
    "user@exämple.fr",
    "a..b@example.fr",
    ".a@example.fr",
    "a@example",
    "a@-example.fr",
    "a@localhost",
    "a@example.local",
    "@example.fr",
    "a@",
    "a@b@example.fr",
    '"quoted"@example.fr',
    "x" * 64 + "@example.fr",
    "x" * 65 + "@example.fr",
    "x" * 60 + "@" + ".".join(["d" * 63] * 3) + ".fr",
    "a b@example.fr",
    "a@exa_mple.fr",
]


@pytest.mark.parametrize("address", EMAILS)
def test_email_check_agrees_with_email_validator(address: str) -> None:
    check = _EmailCheck()
    try:
        expected: str | None = validate_email(address, check_deliverability=False).normalized
    except EmailNotValidError:
        expected = None
    for _ in range(2):  # the second time the domain is remembered
        try:
            got: str | None = check.normalise(address)
        except EmailNotValidError:
            got = None
        assert got == expected


def test_email_check_agrees_near_the_length_limit() -> None:
    """254 bytes as given, normalised or in IDNA form: the three must fit."""
    check = _EmailCheck()
    domains = [
        ".".join(["d" * 63] * 3) + ".fr",
        ".".join(["例え" * 7] * 5) + ".jp",  # longer in UTF-8 than in IDNA
        ".".join(["école" * 10] * 4) + ".fr",
        ".".join(["例" * 18] * 6) + ".jp",  # too long whatever the local part
        "xn--exmple-cua.fr",
    ]
    for domain in domains:
        for size in range(1, 65):
            address = "a" * size + "@" + domain
            try:
                expected: str | None = validate_email(
                    address, check_deliverability=False
                ).normalized
            except EmailNotValidError:
                expected = None
            try:
                got: str | None = check.normalise(address)
            except EmailNotValidError:
                got = None
            assert got == expected, address


async def test_fifty_thousand_rows(sessions: Sessions, clock: FakeClock, tmp_path: Path) -> None:
    n = 50_000
    path = tmp_path / "big.csv"

    def rows() -> Iterable[dict[str, str]]:
        for i in range(n):
            row = {
                "ins": ins(i, yy=i % 100, mm=i % 12 + 1),
                "status": "created",
                "insurer_email": f"patient{i}@assure{i % 50}.fr",
                "given_name": "Camille",
                "family_name": f"Nom{i}",
                "birth_date": "1990-06-15",
                "postal_address": f"{i} rue X | 75011 Paris",
            }
            if i % 10 == 9:  # a minor whose representative comes just before it
                row |= {"representatives": ins(i - 1, yy=(i - 1) % 100, mm=(i - 1) % 12 + 1)}
            yield row

    write_csv(path, rows())
    started = time.perf_counter()
    report = await import_patients(sessions, path, clock=clock)
    elapsed = time.perf_counter() - started
    print(f"\n{n} rows imported in {elapsed:.2f} s: {n / elapsed:,.0f} rows/s")

    assert report.errors == []
    assert report.created == n
    assert await count(sessions, Patient) == n
    assert await count(sessions, PatientLink) == n // 10
    assert len(await events(sessions, "patients.imported")) == n // 5000

    started = time.perf_counter()
    again = await import_patients(sessions, path, clock=clock)
    elapsed = time.perf_counter() - started
    print(f"unchanged re-import: {n / elapsed:,.0f} rows/s")
    assert again.unchanged == n
    assert await count(sessions, Patient) == n


SIMPLE_ROWS: list[dict[str, str]] = [
    {"ins": ins(1), "status": "created"},
    {"ins": ins(2), "status": "activated", "activation_email": "a.b@Example.FR"},
    {"ins": ins(3), "status": "activated", "activation_email": "élodie@exemple.fr"},
    {"ins": ins(4), "status": "Created"},  # not as written in the schema: the full way
    {"ins": f" {ins(5)}", "status": "created"},  # spaces around the INS
    {"ins": corsican(6), "status": "created"},
    {"ins": ins(7), "status": "closed", "postal_address": " 1 rue X |  | 75001 Paris "},
    {"ins": ins(8), "status": "closed", "postal_address": r"1 rue X\n75001 Paris"},
    {"ins": ins(9), "status": "created", "birth_date": "2020-02-30"},
    {"ins": ins(10), "status": "created", "birth_date": "2020-02-28"},
    {"ins": ins(11), "status": "created", "representatives": f"{ins(1)}; {ins(2)};{ins(1)}"},
    {"ins": ins(12), "status": "created", "representatives": ins(1), "helpers": ins(1)},
    {"ins": ins(13), "status": "created", "representatives": ins(13)},
    {"ins": ins(14), "status": "created", "given_name": " Anne ", "family_name": "x" * 201},
    {"ins": ins(15), "status": "created", "insurer_email": " a@example.fr"},
    {"ins": ins(16), "status": "activated", "activation_email": "postmaster@example.fr"},
    {"ins": "1850175000001", "status": "created"},
]


def test_simple_rows_agree_with_the_full_checks() -> None:
    """The fast path for rows of the usual shape gives what the full checks give, or steps aside."""
    parser = _RowParser()
    taken = 0
    for raw in SIMPLE_ROWS:
        row = {name: raw.get(name, "") for name in FIELDS}
        full = parser.parse(row, from_csv=True)
        quick = parser.simple(row)
        if quick is None:
            continue
        taken += 1
        assert full.row is not None, raw
        ins_value, values, representatives, helpers = quick
        staged = _staged(full.row)
        assert (ins_value, *values) == (full.row.ins, *staged[:7]), raw
        assert (";".join(representatives) or None, ";".join(helpers) or None) == staged[7:]
    assert taken >= 8  # most rows of the list go the fast way


async def test_two_hundred_thousand_rows(
    sessions: Sessions, clock: FakeClock, tmp_path: Path
) -> None:
    """The bulk path end to end: create, re-import unchanged, then a file changing some rows."""
    n = 200_000

    def row(i: int, *, version: int = 0) -> dict[str, str]:
        values = {
            "ins": ins(i % 1_000_000, yy=i % 100, mm=i % 12 + 1),
            "status": "created",
            "insurer_email": f"p{i}@assure{i % 7}.fr",
            "family_name": f"Nom{i}",
            "birth_date": f"19{i % 100:02d}-0{i % 9 + 1}-1{i % 10}",
            "postal_address": f"{i} rue X | 75011 Paris",
        }
        if i % 10 == 9:
            values["representatives"] = row(i - 1)["ins"]
        if i % 1000 == 999:  # named before its own row
            values["helpers"] = row(i + 1)["ins"] if i + 1 < n else ""
        if version and i % 100 == 0:
            values |= {"status": "activated", "activation_email": f"new{i}@example.fr"}
        if version and i % 10 == 9 and i % 20 == 19:
            values["representatives"] = ""  # links dropped
        return values

    first = write_csv(tmp_path / "a.csv", (row(i) for i in range(n)))
    report = await import_patients(sessions, first, clock=clock, scratch_dir=tmp_path)
    assert (report.created, report.errors) == (n, [])
    assert await count(sessions, Patient) == n
    expected_links = n // 10 + n // 1000 - (1 if (n - 1) % 1000 == 999 else 0)
    assert await count(sessions, PatientLink) == expected_links
    async with sessions() as session:
        sample = await session.scalar(select(Patient).where(Patient.ins == row(12_345)["ins"]))
    assert sample is not None
    assert (sample.family_name, sample.postal_address) == ("Nom12345", "12345 rue X\n75011 Paris")
    assert sample.birth_date == date(1945, 7, 15)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("mssante-import-")] == []

    clock.advance(days=1)
    again = await import_patients(sessions, first, clock=clock)
    assert (again.created, again.updated, again.unchanged) == (0, 0, n)

    second = write_csv(tmp_path / "b.csv", (row(i, version=1) for i in range(n)))
    changed = await import_patients(sessions, second, clock=clock)
    updated = n // 100 + n // 20
    assert (changed.created, changed.updated, changed.unchanged) == (0, updated, n - updated)
    assert await count(sessions, PatientLink) == expected_links - n // 20
    status_events = await events(sessions, "patient.status_changed")
    assert len(status_events) == n // 100
    assert {e.details["to"] for e in status_events} == {"activated"}
    async with sessions() as session:
        activated = await session.scalar(select(Patient).where(Patient.ins == row(500)["ins"]))
    assert activated is not None
    assert activated.activated_at == activated.updated_at == clock.now()
    assert activated.activation_email == "new500@example.fr"
    assert audit.verify_chain(await events(sessions)) == []


async def test_memory_stays_bounded(sessions: Sessions, clock: FakeClock, tmp_path: Path) -> None:
    """Rows go through the scratch database: the Python heap does not grow with the file."""

    def rows(n: int) -> Iterable[dict[str, str]]:
        for i in range(n):
            yield {"ins": ins(i, yy=i % 100), "status": "created", "family_name": f"N{i}"}

    peaks = []
    for n in (25_000, 75_000):  # both over the rows staged at a time (20,000)
        path = write_csv(tmp_path / f"{n}.csv", rows(n))
        tracemalloc.start()
        try:
            report = await import_patients(sessions, path, clock=clock, batch_size=2000)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert report.errors == []
    # Three times the rows, not more memory (a dict of the file's INS alone
    # would take some 100 bytes a row: 5 MB more).
    assert peaks[1] < peaks[0] + 1_000_000, peaks
