"""Importing the patient directory from a file (``mssante patients import FILE``).

The file is CSV (header row, UTF-8, ``,``) or JSON Lines, with the fields
of :data:`FIELDS`.  It may hold millions of rows (a national directory:
tens of millions), so it is never held in memory:

1. every row is parsed once, checked and written, normalised, to a scratch
   SQLite database (:class:`_Staging`, in a temporary directory); then
   duplicates and references are checked there with SQL: *all* problems
   are collected, each with its physical line number; representatives and
   helpers must be in the file (earlier or later) or already in the
   directory;
2. if nothing is wrong (or ``skip_invalid``), the valid rows are read back
   from the scratch database and written in transactions of ``batch_size``
   rows: one SELECT of the batch's INS, an executemany INSERT of the new
   patients, an executemany UPDATE of the changed ones, the links, the
   audit events, with values given to the driver in the database's form
   (:class:`_Sql`).

What stays in memory is the errors and one batch.  Re-importing the same
file changes nothing (idempotent upsert keyed on the INS).  Profiles of
BENCHMARKS.md "Directory": parsing dominates, so rows of the usual shape
(digits-only INS, known status, plain values) take a fast path that gives
the same result as the full checks or steps aside for them.
"""

from __future__ import annotations

import asyncio
import csv
import json
import re
import sqlite3
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import IO, Any, NamedTuple, TypeVar, cast

from email_validator import EmailNotValidError, validate_email
from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES
from sqlalchemy import Table, select
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker

from mssante.clock import Clock
from mssante.routing.ins import InsError, parse_ins
from mssante.store import audit
from mssante.store.models import LinkRole, Patient, ProfileStatus

FIELDS = (
    "ins",
    "status",
    "activation_email",
    "insurer_email",
    "given_name",
    "family_name",
    "birth_date",
    "postal_address",
    "representatives",
    "helpers",
)
REQUIRED = ("ins", "status")
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}

# Columns an import sets; a patient is "unchanged" when all of them (and its
# links) already have the file's values.
_DATA_COLUMNS = tuple(f for f in FIELDS if f not in ("ins", "representatives", "helpers"))
_STATUSES = ", ".join(s.value for s in ProfileStatus)
_NAME_MAX = 200  # models.Patient.given_name / family_name
_ADDRESS_MAX = 2000
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
# CSV has one line per row, so a postal address separates its lines with
# " | " or a literal backslash-n (a real line break inside quotes works too).
_CSV_ADDRESS_BREAK = re.compile(r" \| |\\n|\r?\n")
# Bind parameters per IN (...): far below SQLite's 32766 and PostgreSQL's 32767.
_IN_CHUNK = 5000

_PATIENTS = cast(Table, Patient.__table__)

_T = TypeVar("_T")


@dataclass(frozen=True)
class RowError:
    line: int  # 1-based physical line in the file (CSV: the header is line 1)
    reason: str  # problems of the row, "; "-separated


@dataclass(frozen=True)
class ImportReport:
    rows: int
    created: int
    updated: int
    unchanged: int
    errors: list[RowError]
    imported: bool  # False when nothing was written because of errors


async def import_patients(
    sessions: async_sessionmaker[AsyncSession],
    path: Path,
    *,
    clock: Clock,
    actor: str = "cli",
    fmt: str | None = None,
    skip_invalid: bool = False,
    batch_size: int = 5000,
    progress: Callable[[int], None] | None = None,
    scratch_dir: Path | None = None,
) -> ImportReport:
    """Check ``path``, then upsert its patients and their links.

    ``sessions`` must be writer sessions; one is open at a time.  With any
    invalid row nothing is written unless ``skip_invalid``; a bad CSV header
    (unknown, missing or repeated column) is reported on line 1 and stops the
    import in both cases.  Each patient's links become exactly those of the
    file (no ``representatives`` value means no representative).

    ``progress`` is called while writing, after each batch, with the number
    of rows of the file it covered (skipped invalid rows included), so the
    calls add up to ``rows``; the check pass does not call it.

    A database error propagates; the batches committed before it stay (each
    is consistent, with its audit event) and running the import again
    completes the rest.

    The scratch database goes in a temporary directory under ``scratch_dir``
    (default: the system's, ``$TMPDIR``); it takes about the size of the file
    again and is removed at the end.

    Raises ``ValueError`` for an unknown format.
    """
    kind = file_format(path, fmt)
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    errors: dict[int, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="mssante-import-", dir=scratch_dir) as scratch:
        staging = _Staging(Path(scratch))
        try:
            try:
                rows = await asyncio.to_thread(
                    _stage_file, path, kind, _RowParser(), staging, errors
                )
            except _HeaderError as exc:
                return ImportReport(0, 0, 0, 0, [RowError(1, str(exc))], imported=False)
            await _check_staged(sessions, staging, errors)
            report = [RowError(n, "; ".join(reasons)) for n, reasons in sorted(errors.items())]
            if report and (not skip_invalid or rows == len(report)):
                return ImportReport(rows, 0, 0, 0, report, imported=False)
            counts = await _write_staged(
                sessions,
                staging,
                rows,
                clock=clock,
                actor=actor,
                batch_size=batch_size,
                progress=progress,
            )
        finally:
            staging.close()
    return ImportReport(
        rows, counts.created, counts.updated, counts.unchanged, report, imported=True
    )


def file_format(path: Path, fmt: str | None = None) -> str:
    """``"csv"`` or ``"jsonl"``, from ``fmt`` if given, else from the file's extension."""
    if fmt is not None:
        kind = {"csv": "csv", "jsonl": "jsonl", "ndjson": "jsonl"}.get(fmt.lower())
        if kind is None:
            raise ValueError(f"unknown import format {fmt!r}: use csv or jsonl")
        return kind
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(
            f"cannot tell the format of {path.name} from its extension: "
            "name it .csv, .jsonl or .ndjson, or give the format"
        )
    return kind


# --- Reading ---------------------------------------------------------------


# A row as read: its fields, or why it could not be read at all.
_Raw = dict[str, Any] | str


class _HeaderError(Exception):
    pass


def _decoded(fh: IO[bytes], bad_lines: set[int]) -> Iterator[str]:
    """The file's lines as text; a line that is not UTF-8 is noted and decoded lossily."""
    for number, data in enumerate(fh, 1):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            bad_lines.add(number)
            text = data.decode("utf-8", "replace")
        if number == 1 and text.startswith("\ufeff"):
            text = text[1:]  # a BOM, as spreadsheets write
        yield text


def _csv_rows(fh: IO[bytes]) -> Iterator[tuple[int, _Raw]]:
    bad_lines: set[int] = set()
    reader = csv.reader(_decoded(fh, bad_lines))
    try:
        header = [name.strip().lower() for name in next(reader, [])]
    except csv.Error as exc:
        raise _HeaderError(f"header: not readable as CSV ({exc})") from exc
    problems = []
    if not header:
        problems.append("no header row")
    if 1 in bad_lines:
        problems.append("header: not valid UTF-8")
    for name in sorted({n for n in header if header.count(n) > 1}):
        problems.append(f"column {name!r} appears more than once")
    problems += [f"unknown column {name!r}" for name in header if name not in FIELDS]
    problems += [f"missing column {name!r}" for name in REQUIRED if header and name not in header]
    if problems:
        raise _HeaderError("; ".join(problems))
    width = len(header)
    end = reader.line_num
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # e.g. an unclosed quote swallowing the lines after it
            start, end = end + 1, reader.line_num
            yield start, f"not readable as CSV ({exc})"
            continue
        # A quoted value may span lines: the row starts after the previous one.
        start, end = end + 1, reader.line_num
        if not values:
            continue  # blank line
        if bad_lines and any(n in bad_lines for n in range(start, end + 1)):
            yield start, "not valid UTF-8"
        elif len(values) != width:
            yield start, f"{len(values)} fields, the header has {width}"
        else:
            yield start, dict(zip(header, values))  # noqa: B905 (same length: checked)


def _jsonl_rows(fh: IO[bytes]) -> Iterator[tuple[int, _Raw]]:
    bad_lines: set[int] = set()
    for number, text in enumerate(_decoded(fh, bad_lines), 1):
        if not text.strip():
            continue
        if number in bad_lines:
            yield number, "not valid UTF-8"
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            yield number, f"not valid JSON ({exc.msg})"
            continue
        if not isinstance(value, dict):
            yield number, "not a JSON object"
            continue
        yield number, value


@contextmanager
def _rows(path: Path, kind: str) -> Iterator[Iterator[tuple[int, _Raw]]]:
    """(line, row) for each non-blank row; raises _HeaderError on a bad CSV header."""
    with path.open("rb") as fh:
        yield _csv_rows(fh) if kind == "csv" else _jsonl_rows(fh)


# --- Checking one row ------------------------------------------------------


class _Row(NamedTuple):
    """A valid row, ready to be written."""

    ins: str
    values: dict[str, Any]  # the columns of _DATA_COLUMNS
    wanted: dict[str, LinkRole]  # adult INS -> role: the patient's links


class _Parsed(NamedTuple):
    ins: str | None  # normalised, when the field is valid
    row: _Row | None  # when the row has no problem of its own
    links: list[tuple[str, str]]  # (field, adult INS), the valid ones
    problems: list[str]


class _EmailCheck:
    """``email_validator`` with its costly part, the domain (IDNA tables), remembered.

    Checking the domain is two thirds of the time of a ``validate_email`` call
    and an import has few distinct domains.  For the common local part (ASCII
    dot-atom, no RFC 2142 role name, which the library lower-cases) the
    library's answer is then "valid, local@normalised-domain" as long as the
    address fits in 254 bytes in each of the forms the library measures (as
    given, normalised, IDNA); every other address, and every domain the
    library refuses, goes through ``validate_email`` itself.
    """

    _SIMPLE_LOCAL = re.compile(r"[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*")
    _MAX_DOMAINS = 100_000

    def __init__(self) -> None:
        # domain -> (normalised, its longest length in UTF-8 bytes among its forms)
        self._domains: dict[str, tuple[str, int]] = {}

    def normalise(self, address: str) -> str:
        """The normalised address; raises ``EmailNotValidError``."""
        local, at, domain = address.rpartition("@")
        if (
            at
            and len(local) <= 64
            and self._SIMPLE_LOCAL.fullmatch(local)
            and local.lower() not in CASE_INSENSITIVE_MAILBOX_NAMES
        ):
            known = self._domains.get(domain)
            if known is None:
                try:
                    probe = validate_email("x@" + domain, check_deliverability=False)
                except EmailNotValidError:
                    pass  # the full check below gives the message for the real address
                else:
                    if len(self._domains) >= self._MAX_DOMAINS:
                        self._domains.clear()
                    forms = (domain, probe.domain, probe.ascii_domain)
                    longest = max(len(form.encode()) for form in forms)
                    known = self._domains[domain] = (probe.domain, longest)
            if known is not None and len(local) + 1 + known[1] <= 254:
                return f"{local}@{known[0]}"
        return validate_email(address, check_deliverability=False).normalized


_STATUS_BY_VALUE = {status.value: status for status in ProfileStatus}


class _RowParser:
    """One row's fields, checked and normalised; the same code serves both passes.

    This runs twice per row of files of millions of rows: it avoids what is
    slow in CPython (enum look-ups, frozen dataclasses, regular expressions
    where a test on a character does).
    """

    _MAX_DATES = 100_000

    def __init__(self) -> None:
        self._email = _EmailCheck()
        self._dates: dict[str, date] = {}  # birth dates repeat: ~36,500 a century

    def simple(
        self, raw: Mapping[str, str]
    ) -> tuple[str, _Staged, tuple[str, ...], tuple[str, ...]] | None:
        """A CSV row of the usual shape, the fast way: (INS, staged values,
        representatives, helpers), or None to let :meth:`parse` decide.

        Same result as :meth:`parse` for the rows it accepts: a digits-only
        INS whose key matches, a status as written in the schema, addresses
        the e-mail check takes, a known date or none, no value too long.
        Anything else (and any problem) goes the full way, which says why.
        """
        get = raw.get
        ins = get("ins")
        if ins is None or not _simple_ins(ins):
            return None
        status = get("status")
        if status not in _STATUS_BY_VALUE:
            return None
        activation_email = get("activation_email") or None
        if activation_email is not None:
            activation_email = self._simple_email(activation_email)
            if activation_email is None:
                return None
            # Lower-case: the webmail logs in by it (store/credentials.py).
            activation_email = activation_email.lower()
        elif status == "activated":
            return None
        insurer_email = get("insurer_email") or None
        if insurer_email is not None:
            insurer_email = self._simple_email(insurer_email)
            if insurer_email is None:
                return None
        given_name = get("given_name")
        if given_name:
            given_name = given_name.strip()
            if len(given_name) > _NAME_MAX:
                return None
        family_name = get("family_name")
        if family_name:
            family_name = family_name.strip()
            if len(family_name) > _NAME_MAX:
                return None
        birth_date = get("birth_date")
        if birth_date and self._known_date(birth_date) is None:
            return None  # the full way says why
        problems: list[str] = []
        postal_address = _address(get("postal_address"), problems, from_csv=True)
        representatives = _simple_ins_list(get("representatives"), ins)
        helpers = _simple_ins_list(get("helpers"), ins)
        if problems or representatives is None or helpers is None:
            return None
        if representatives and helpers and not set(representatives).isdisjoint(helpers):
            return None
        values = (
            status,
            activation_email,
            insurer_email,
            given_name or None,
            family_name or None,
            birth_date or None,
            postal_address,
        )
        return ins, values, representatives, helpers

    def _simple_email(self, text: str) -> str | None:
        if len(text) > 1000 or text[0].isspace() or text[-1].isspace():
            return None
        try:
            return self._email.normalise(text)
        except EmailNotValidError:
            return None

    def parse(self, raw: Mapping[str, Any], *, from_csv: bool) -> _Parsed:
        problems: list[str] = []
        if not from_csv:  # the CSV header was checked once
            problems += [f"unknown key {key!r}" for key in raw if key not in FIELDS]
        get = raw.get
        ins = self._ins(get("ins"), problems)
        status = self._status(get("status"), problems)
        activation_email = self._email_field("activation_email", get("activation_email"), problems)
        if activation_email is not None:
            activation_email = activation_email.lower()  # the webmail logs in by it
        bad_activation_email = bool(problems) and problems[-1].startswith("activation_email:")
        # DOMAIN.md 3: an activated profile is notified at its activation address.
        if (
            status is ProfileStatus.ACTIVATED
            and activation_email is None
            and not bad_activation_email
        ):
            problems.append("activation_email: required when status is activated")
        insurer_email = self._email_field("insurer_email", get("insurer_email"), problems)
        given_name = _text("given_name", get("given_name"), problems, _NAME_MAX)
        family_name = _text("family_name", get("family_name"), problems, _NAME_MAX)
        birth_date = self._date(get("birth_date"), problems)
        postal_address = _address(get("postal_address"), problems, from_csv=from_csv)
        representatives = _ins_list(
            "representatives", get("representatives"), ins, problems, from_csv=from_csv
        )
        helpers = _ins_list("helpers", get("helpers"), ins, problems, from_csv=from_csv)
        links = [("representatives", a) for a in representatives]
        links += [("helpers", a) for a in helpers]
        if representatives and helpers:
            both = sorted(set(representatives) & set(helpers))
            problems += [f"helpers: {adult} is already a representative" for adult in both]
        if problems or ins is None or status is None:
            return _Parsed(ins, None, links, problems)
        wanted = dict.fromkeys(helpers, LinkRole.HELPER)
        wanted.update(dict.fromkeys(representatives, LinkRole.REPRESENTATIVE))
        values = {
            "status": status,
            "activation_email": activation_email,
            "insurer_email": insurer_email,
            "given_name": given_name,
            "family_name": family_name,
            "birth_date": birth_date,
            "postal_address": postal_address,
        }
        return _Parsed(ins, _Row(ins, values, wanted), links, problems)

    @staticmethod
    def _ins(value: Any, problems: list[str]) -> str | None:
        text = _text("ins", value, problems, 100)
        if text is None:
            if value is None or isinstance(value, str):
                problems.append("ins: required")
            return None
        ins = parse_ins(text)
        if isinstance(ins, InsError):
            problems.append(f"ins: {ins.detail}")
            return None
        return ins.value

    @staticmethod
    def _status(value: Any, problems: list[str]) -> ProfileStatus | None:
        text = _text("status", value, problems, 100)
        if text is None:
            if value is None or isinstance(value, str):
                problems.append("status: required")
            return None
        status = _STATUS_BY_VALUE.get(text) or _STATUS_BY_VALUE.get(text.lower())
        if status is None:
            problems.append(f"status: {text!r} is not one of {_STATUSES}")
        return status

    def _email_field(self, field: str, value: Any, problems: list[str]) -> str | None:
        text = _text(field, value, problems, 1000)
        if text is None:
            return None
        try:
            return self._email.normalise(text)
        except EmailNotValidError as exc:
            problems.append(f"{field}: {exc}")
            return None

    def _date(self, value: Any, problems: list[str]) -> date | None:
        text = _text("birth_date", value, problems, 100)
        if text is None:
            return None
        known = self._known_date(text)
        if known is None:
            problems.append(f"birth_date: {text!r} is not a date (YYYY-MM-DD)")
        return known

    def _known_date(self, text: str) -> date | None:
        known = self._dates.get(text)
        if known is not None:
            return known
        if _DATE.fullmatch(text):
            try:
                known = date.fromisoformat(text)
            except ValueError:
                return None
            if len(self._dates) >= self._MAX_DATES:
                self._dates.clear()
            self._dates[text] = known
        return known


# routing/ins.py for the usual INS (digits only): sex, month, key.
_MONTHS = frozenset(f"{m:02d}" for m in (*range(1, 13), *range(20, 100)))


def _simple_ins(text: str) -> bool:
    """True when ``parse_ins(text)`` would accept ``text`` as it is, for digits-only INS."""
    return (
        len(text) == 15
        and text.isdigit()
        and text.isascii()
        and text[0] in "123478"
        and text[3:5] in _MONTHS
        and int(text[13:]) == 97 - int(text[:13]) % 97
    )


def _simple_ins_list(value: str | None, own: str) -> tuple[str, ...] | None:
    """Representatives or helpers of the usual shape, as _ins_list gives them; None otherwise."""
    if not value:
        return ()
    found: dict[str, None] = {}
    for item in value.split(";"):
        item = item.strip()
        if not item:
            continue
        if not _simple_ins(item) or item == own:
            return None
        found[item] = None
    return tuple(found)


def _text(field: str, value: Any, problems: list[str], limit: int) -> str | None:
    """A stripped string field; empty or absent is None."""
    if value is None:
        return None
    if not isinstance(value, str):
        problems.append(f"{field}: must be a string")
        return None
    value = value.strip()
    if len(value) > limit:
        problems.append(f"{field}: longer than {limit} characters")
        return None
    return value or None


def _address(value: Any, problems: list[str], *, from_csv: bool) -> str | None:
    if not value:
        return None
    if isinstance(value, str):
        if from_csv and ("\\" in value or "\n" in value):
            lines: list[Any] = _CSV_ADDRESS_BREAK.split(value)
        elif from_csv and "|" in value:
            lines = value.split(" | ")  # the only break the pattern can find here
        elif not from_csv and "\n" in value:
            lines = value.splitlines()
        else:
            lines = [value]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        lines = value
    else:
        problems.append("postal_address: must be a string or a list of strings")
        return None
    if len(lines) == 1:
        text = lines[0].strip()
    else:
        text = "\n".join([stripped for line in lines if (stripped := line.strip())])
    if len(text) > _ADDRESS_MAX:
        problems.append(f"postal_address: longer than {_ADDRESS_MAX} characters")
        return None
    return text or None


def _ins_list(
    field: str, value: Any, own: str | None, problems: list[str], *, from_csv: bool
) -> tuple[str, ...]:
    """Representatives or helpers: distinct valid INS, never the patient's own."""
    if not value:
        return ()
    if from_csv and isinstance(value, str):
        items: list[Any] = value.split(";")
    elif not from_csv and isinstance(value, list):
        items = value
    else:
        problems.append(f"{field}: must be a list of INS")
        return ()
    found: dict[str, None] = {}  # ordered set: a repeated INS counts once
    for item in items:
        if not isinstance(item, str):
            problems.append(f"{field}: {item!r} is not a string")
            continue
        if not (item := item.strip()):
            continue
        ins = parse_ins(item)
        if isinstance(ins, InsError):
            problems.append(f"{field}: {item!r} is not a valid INS ({ins.detail})")
        elif ins.value == own:
            role = "representative" if field == "representatives" else "helper"
            problems.append(f"{field}: a patient cannot be its own {role}")
        else:
            found[ins.value] = None
    return tuple(found)


# --- First pass: check the whole file into a staging database -------------


class _Staging:
    """A scratch SQLite database holding the file's rows, checked and normalised.

    The first pass parses each row once and writes it here; duplicates and
    references are then found with SQL, and the second pass reads the valid
    rows back instead of parsing the file again.  Memory stays bounded by
    SQLite's page cache whatever the size of the file.  Nothing here needs
    to survive a crash (the import is run again), hence no journal and no
    fsync.
    """

    _SCHEMA = (
        # One row per row of the file, in order (n: 1, 2...; line: its first
        # physical line); ok = 1 when the row has no problem of its own, and
        # then its normalised values, links as ";"-separated INS.
        "CREATE TABLE rows (line INTEGER PRIMARY KEY, n INTEGER NOT NULL, ins TEXT,"
        " ok INTEGER NOT NULL, status TEXT, activation_email TEXT, insurer_email TEXT,"
        " given_name TEXT, family_name TEXT, birth_date TEXT, postal_address TEXT,"
        " representatives TEXT, helpers TEXT)",
        # Every representative or helper a row names (ord: its place in the row).
        "CREATE TABLE refs (line INTEGER NOT NULL, ord INTEGER NOT NULL, field TEXT NOT NULL,"
        " adult TEXT NOT NULL)",
        # Patients whose adults were not all written yet when their batch was.
        "CREATE TABLE later (line INTEGER NOT NULL)",
    )

    def __init__(self, directory: Path) -> None:
        self.path = directory / "staging.db"
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        # The writer's connection reads it too (SQLite: attached): no exclusive lock.
        for pragma in ("journal_mode = OFF", "synchronous = OFF", "cache_size = -65536"):
            self.db.execute(f"PRAGMA {pragma}")
        for statement in self._SCHEMA:
            self.db.execute(statement)
        self._refs_by_adult = False

    def close(self) -> None:
        self.db.close()

    def index_refs_by_adult(self) -> None:
        if not self._refs_by_adult:
            self.db.execute("CREATE INDEX refs_adult ON refs (adult)")
            self._refs_by_adult = True


# Staged values of a valid row, in the order of the ``rows`` columns after ok.
_Staged = tuple[str, str | None, str | None, str | None, str | None, str | None, str | None]
_STAGE_ROWS = "INSERT INTO rows VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_STAGE_REFS = "INSERT INTO refs VALUES (?, ?, ?, ?)"
_STAGE_CHUNK = 20_000
_NOTHING = (None,) * 9  # the columns after ok of a row that is not valid


def _stage_file(
    path: Path, kind: str, parser: _RowParser, staging: _Staging, errors: dict[int, list[str]]
) -> int:
    """First pass: parse every row once into ``staging``; returns the number of rows.

    Runs in a worker thread (CPU and the staging file only).  Each row's own
    problems go to ``errors``; duplicates and references are checked later.
    """
    from_csv = kind == "csv"
    simple = parser.simple if from_csv else None
    rows_out: list[tuple[Any, ...]] = []
    refs_out: list[tuple[int, int, str, str]] = []
    db = staging.db
    n = 0

    def flush() -> None:
        db.executemany(_STAGE_ROWS, rows_out)
        db.executemany(_STAGE_REFS, refs_out)
        rows_out.clear()
        refs_out.clear()

    db.execute("BEGIN")
    with _rows(path, kind) as rows:
        for line, raw in rows:
            n += 1
            if isinstance(raw, str):
                errors[line] = [raw]
                rows_out.append((line, n, None, 0, *_NOTHING))
                continue
            quick = simple(raw) if simple is not None else None
            if quick is not None:
                ins, values, representatives, helpers = quick
                links = [("representatives", a) for a in representatives]
                links += [("helpers", a) for a in helpers]
                rows_out.append(
                    (
                        line,
                        n,
                        ins,
                        1,
                        *values,
                        ";".join(representatives) or None,
                        ";".join(helpers) or None,
                    )
                )
            else:
                parsed = parser.parse(raw, from_csv=from_csv)
                links = parsed.links
                row = parsed.row
                if row is None:
                    errors[line] = ["; ".join(parsed.problems)]
                    rows_out.append((line, n, parsed.ins, 0, *_NOTHING))
                else:
                    rows_out.append((line, n, row.ins, 1, *_staged(row)))
            if links:
                refs_out += [(line, i, field, adult) for i, (field, adult) in enumerate(links)]
            if len(rows_out) >= _STAGE_CHUNK:
                flush()
    flush()
    db.execute("COMMIT")
    db.execute("CREATE INDEX rows_ins ON rows (ins)")
    return n


def _staged(row: _Row) -> tuple[Any, ...]:
    values = row.values
    birth_date = values["birth_date"]
    wanted = row.wanted.items()
    return (
        values["status"].value,
        values["activation_email"],
        values["insurer_email"],
        values["given_name"],
        values["family_name"],
        None if birth_date is None else birth_date.isoformat(),
        values["postal_address"],
        ";".join(a for a, role in wanted if role is LinkRole.REPRESENTATIVE) or None,
        ";".join(a for a, role in wanted if role is LinkRole.HELPER) or None,
    )


# The references whose adult has no valid first row in the file, with what
# the verdict needs: where the adult is, and whether the naming row is the
# first (valid) row of its own INS.
_UNRESOLVED_REFS = """
SELECT f.line, f.field, f.adult, a.line, r.ins,
       r.ok AND r.line = (SELECT min(line) FROM rows WHERE ins = r.ins)
FROM refs AS f
JOIN rows AS r ON r.line = f.line
LEFT JOIN rows AS a ON a.line = (SELECT min(line) FROM rows WHERE ins = f.adult)
WHERE a.ok IS NOT 1
ORDER BY f.line, f.ord
"""
_DUPLICATES = """
SELECT r.line, f.first
FROM (SELECT ins, min(line) AS first FROM rows WHERE ins IS NOT NULL
      GROUP BY ins HAVING count(*) > 1) AS f
JOIN rows AS r ON r.ins = f.ins AND r.line > f.first
"""
_REFS_TO = """
SELECT f.line, f.ord, f.field, f.adult, a.line, r.ins,
       r.ok AND r.line = (SELECT min(line) FROM rows WHERE ins = r.ins)
FROM refs AS f
JOIN rows AS r ON r.line = f.line
LEFT JOIN rows AS a ON a.line = (SELECT min(line) FROM rows WHERE ins = f.adult)
WHERE f.adult IN ({})
"""
# Bind parameters per IN (...) on the staging database.
_STAGING_IN = 500


async def _check_staged(
    sessions: async_sessionmaker[AsyncSession], staging: _Staging, errors: dict[int, list[str]]
) -> None:
    """Add the errors that need the whole file: duplicates, then references.

    An adult is usable when its first row in the file is valid or it is in
    the directory.  A row refused for a reference makes its own INS
    unusable in turn (unless that patient is in the directory), so the rows
    naming it are refused too, and so on.
    """
    db = staging.db
    for line, first in await asyncio.to_thread(lambda: db.execute(_DUPLICATES).fetchall()):
        errors.setdefault(line, []).append(f"ins: already on line {first}")

    unresolved = await asyncio.to_thread(lambda: db.execute(_UNRESOLVED_REFS).fetchall())
    in_directory = await _existing(sessions, {row[2] for row in unresolved})
    refused: set[str] = set()  # INS whose valid first row was refused for a reference
    newly: set[str] = set()
    for line, field, adult, adult_line, own, own_first_ok in unresolved:
        if adult not in in_directory:
            _refuse(errors, line, field, adult, adult_line)
            if own_first_ok and own not in refused:
                refused.add(own)
                newly.add(own)

    # Rare: a row invalid only now invalidates the rows that name it.
    while newly:
        newly -= await _existing(sessions, newly)
        if not newly:
            break
        named, newly = sorted(newly), set()
        staging.index_refs_by_adult()
        found: list[Any] = []
        for start in range(0, len(named), _STAGING_IN):
            chunk = named[start : start + _STAGING_IN]
            query = _REFS_TO.format(", ".join("?" * len(chunk)))
            found += db.execute(query, chunk).fetchall()
        before = set(errors)
        for line, _ord, field, adult, adult_line, own, own_first_ok in sorted(found):
            if line in before:
                continue
            _refuse(errors, line, field, adult, adult_line)
            if own_first_ok and own not in refused:
                refused.add(own)
                newly.add(own)

    db.executemany("UPDATE rows SET ok = 0 WHERE line = ?", ((line,) for line in errors))


def _refuse(
    errors: dict[int, list[str]], line: int, field: str, adult: str, adult_line: int | None
) -> None:
    if adult_line is not None:
        reason = f"{adult} is on line {adult_line}, which is invalid"
    else:
        reason = f"{adult} is neither in the file nor in the directory"
    errors.setdefault(line, []).append(f"{field}: {reason}")


# --- Second pass: write ----------------------------------------------------


@dataclass
class _Counts:
    created: int = 0
    updated: int = 0
    unchanged: int = 0


# Per-connection scratch tables holding one batch: its rows, their links
# (adult INS and role), and the existing patients the batch changes.
_BATCH_TABLES = (
    "CREATE TEMP TABLE import_rows (line INTEGER PRIMARY KEY, ins VARCHAR(15) NOT NULL,"
    " status VARCHAR(16), activation_email VARCHAR(320), insurer_email VARCHAR(320),"
    " given_name VARCHAR(200), family_name VARCHAR(200), birth_date VARCHAR(10),"
    " postal_address TEXT)",
    "CREATE INDEX import_rows_ins ON import_rows (ins)",
    "CREATE TEMP TABLE import_links (line INTEGER NOT NULL, ord INTEGER NOT NULL,"
    " ins VARCHAR(15) NOT NULL, adult VARCHAR(15) NOT NULL, role VARCHAR(16) NOT NULL)",
    "CREATE INDEX import_links_ins ON import_links (ins)",
    "CREATE TEMP TABLE import_changed (id INTEGER PRIMARY KEY, ins VARCHAR(15) NOT NULL,"
    " old_status VARCHAR(16), links INTEGER NOT NULL)",
)
_ROW_COLUMNS = ("line", "ins", *_DATA_COLUMNS)
_LINK_COLUMNS = ("line", "ord", "ins", "adult", "role")
# The links of staged rows, as import_links wants them.
_STAGED_LINKS = """
SELECT f.line, f.ord, r.ins, f.adult,
       CASE f.field WHEN 'representatives' THEN 'representative' ELSE 'helper' END
FROM {schema}refs AS f JOIN {schema}rows AS r ON r.line = f.line
WHERE r.ok = 1 AND f.line {where}
ORDER BY f.line, f.ord
"""


class _Batches:
    """Writes the staged rows batch after batch, with set-based statements.

    The batch is copied into temporary tables of the writer's connection
    (SQLite: from the staging database, attached; PostgreSQL: COPY), then a
    few INSERT ... SELECT / UPDATE ... FROM statements compare it with the
    directory and apply it: the per-row work is the database's, not
    Python's.  The same statements serve both databases; only a few
    expressions differ (:meth:`_sql`).
    """

    def __init__(self, conn: AsyncConnection, staging: _Staging) -> None:
        self.conn = conn
        self.staging = staging
        self._cache_size: Any = None
        self.postgresql = conn.dialect.name == "postgresql"
        dialect = conn.dialect
        self.at = _processor(dialect, "created_at")
        self.flag = _processor(dialect, "email_invalid")
        if self.postgresql:
            tokens = {
                "at": "CAST($1 AS TIMESTAMPTZ)",
                "false": "CAST($2 AS BOOLEAN)",
                "same": "IS NOT DISTINCT FROM",
                "differs": "IS DISTINCT FROM",
                "birth": "CAST(b.birth_date AS DATE)",
            }
        else:
            tokens = {
                "at": "?1",
                "false": "?2",
                "same": "IS",
                "differs": "IS NOT",
                "birth": "b.birth_date",
            }
        self._tokens = tokens

    def _sql(self, text: str) -> str:
        return text.format(**self._tokens)

    async def open(self) -> None:
        """Create the batch tables (and on SQLite attach the staging database).

        Before any transaction: SQLite cannot ATTACH inside one.
        """
        if not self.postgresql:
            raw = await self.conn.get_raw_connection()
            driver: Any = raw.driver_connection
            await driver.execute("ATTACH DATABASE ? AS staging", (str(self.staging.path),))
            # Each row is looked up and inserted in the unique index of the
            # INS, in no particular order: with SQLite's default 2 MB of page
            # cache a directory of millions of patients is read from the disk
            # again and again (BENCHMARKS.md "Directory").  Restored in close().
            async with driver.execute("PRAGMA main.cache_size") as cursor:
                row = await cursor.fetchone()
            self._cache_size = row[0]
            await driver.execute(f"PRAGMA main.cache_size = {_SQLITE_IMPORT_CACHE}")
        async with self.conn.begin():
            for statement in _BATCH_TABLES:
                await self.conn.exec_driver_sql(statement)
        if self.postgresql:
            # A batch is a few thousand rows against millions: index look-ups
            # (nested loops) are right, but the planner has no statistics on
            # the temporary tables, nor on a directory that grows from empty
            # during a first import, and may scan or hash the whole of it.
            for setting in _PG_PLANNER_OFF:
                await self.conn.exec_driver_sql(f"SET {setting} = off")
            await self.conn.commit()

    async def _fill(
        self,
        rows_where: str,
        links_where: str,
        params: tuple[Any, ...],
        links_params: tuple[Any, ...],
    ) -> int:
        """Copy the staged rows (and their links) selected into the batch tables.

        Returns the number of links.
        """
        if self.postgresql:
            # Not DELETE: temporary tables are never vacuumed, and dead rows
            # of thousands of batches would slow every statement down.
            await self.conn.exec_driver_sql("TRUNCATE import_rows, import_links, import_changed")
        else:
            for table in ("import_rows", "import_links", "import_changed"):
                await self.conn.exec_driver_sql(f"DELETE FROM {table}")  # noqa: S608
        row_query = (
            f"SELECT {', '.join(_ROW_COLUMNS)} FROM {{schema}}rows "  # noqa: S608
            f"WHERE ok = 1 AND line {rows_where} ORDER BY line"
        )
        link_query = _STAGED_LINKS.replace("{where}", links_where)
        if self.postgresql:
            # COPY through asyncpg, inside the transaction SQLAlchemy began.
            db = self.staging.db
            rows = db.execute(row_query.format(schema=""), params).fetchall()
            links = db.execute(link_query.format(schema=""), links_params).fetchall()
            raw = await self.conn.get_raw_connection()
            driver: Any = raw.driver_connection
            if rows:
                await driver.copy_records_to_table(
                    "import_rows", records=rows, columns=_ROW_COLUMNS
                )
            if links:
                await driver.copy_records_to_table(
                    "import_links", records=links, columns=_LINK_COLUMNS
                )
            return len(links)
        columns = ", ".join(_ROW_COLUMNS)
        await self.conn.exec_driver_sql(
            f"INSERT INTO import_rows ({columns}) {row_query.format(schema='staging.')}",
            params,
        )
        result = await self.conn.exec_driver_sql(
            f"INSERT INTO import_links ({', '.join(_LINK_COLUMNS)}) "
            f"{link_query.format(schema='staging.')}",
            links_params,
        )
        return int(result.rowcount)

    async def write(
        self, session: AsyncSession, first: int, last: int, size: int, *, at: datetime, actor: str
    ) -> tuple[_Counts, list[int]]:
        """Upsert the staged valid rows of lines ``first``..``last`` (``size`` of them).

        Returns the counts and the lines whose adults are not all written yet.
        """
        # The session begins the connection's transaction (the writer's
        # BEGIN IMMEDIATE or lock), so its commit is the batch's commit.
        await session.connection()
        lines = (first, last)
        links = await self._fill("BETWEEN ? AND ?", "BETWEEN ? AND ?", lines, lines)
        execute = self.conn.exec_driver_sql
        params = (self.at(at), self.flag(False))
        existing = await execute(
            "SELECT count(*) FROM import_rows AS b JOIN patients AS p ON p.ins = b.ins"
        )
        found = int(existing.scalar_one())
        if found:
            await execute(self._sql(_CHANGED))
            changes = [tuple(row) for row in await execute(_STATUS_CHANGES)]
            changed = int((await execute("SELECT count(*) FROM import_changed")).scalar_one())
            if changed:
                await execute(self._sql(_UPDATE), params)
        else:
            changes, changed = [], 0
        if found < size:
            await execute(self._sql(_INSERT), params)
        if changed:
            await execute(_DELETE_LINKS)
        if links:
            await self._link(params)
            waiting = await execute(
                "SELECT DISTINCT line FROM import_links AS bl WHERE NOT EXISTS "
                "(SELECT 1 FROM patients AS a WHERE a.ins = bl.adult)"
            )
            later = [line for (line,) in waiting]
        else:
            later = []

        for patient_id, old_status, new_status in changes:
            await audit.append(
                session,
                at=at,
                kind="patient.status_changed",
                actor=actor,
                patient_id=patient_id,
                details={"from": old_status, "to": new_status},
            )
        batch = _Counts(created=size - found, updated=changed, unchanged=found - changed)
        await audit.append(
            session,
            at=at,
            kind="patients.imported",
            actor=actor,
            details={
                "created": batch.created,
                "updated": batch.updated,
                "unchanged": batch.unchanged,
            },
        )
        return batch, later

    async def link_later(self, lines: Sequence[int], *, at: datetime) -> None:
        """Set the links of patients named before their adults, now all written."""
        where = f"IN ({', '.join('?' * len(lines))})"
        await self._fill("IN (NULL)", where, (), tuple(lines))
        execute = self.conn.exec_driver_sql
        missing = (
            await execute(
                "SELECT bl.ins, bl.adult FROM import_links AS bl WHERE "
                "NOT EXISTS (SELECT 1 FROM patients AS p WHERE p.ins = bl.ins) OR "
                "NOT EXISTS (SELECT 1 FROM patients AS a WHERE a.ins = bl.adult)"
            )
        ).all()
        if missing:
            # Checked before writing: only a concurrent change gets here.
            gone = sorted({ins for row in missing for ins in row})
            raise LookupError(f"profiles removed during the import: {', '.join(gone)}")
        await execute(
            "INSERT INTO import_changed (id, ins, old_status, links) "
            "SELECT DISTINCT p.id, p.ins, p.status, 1 FROM import_links AS bl "
            "JOIN patients AS p ON p.ins = bl.ins"
        )
        await execute(_DELETE_LINKS)
        await self._link((self.at(at), self.flag(False)))

    async def _link(self, params: tuple[Any, Any]) -> None:
        """Give the batch's patients the links of import_links (once unwanted
        ones are deleted: _DELETE_LINKS)."""
        execute = self.conn.exec_driver_sql
        await execute(_UPDATE_LINKS)
        await execute(self._sql(_INSERT_LINKS), params[:1])

    async def close(self) -> None:
        """Drop the batch tables and detach the staging database."""
        async with self.conn.begin():
            for table in ("import_rows", "import_links", "import_changed"):
                await self.conn.exec_driver_sql(f"DROP TABLE {table}")
            if self.postgresql:
                for setting in _PG_PLANNER_OFF:
                    await self.conn.exec_driver_sql(f"RESET {setting}")
        if not self.postgresql:
            raw = await self.conn.get_raw_connection()
            driver: Any = raw.driver_connection
            await driver.execute("DETACH DATABASE staging")
            await driver.execute(f"PRAGMA main.cache_size = {int(self._cache_size)}")


_SQLITE_IMPORT_CACHE = -256 * 1024  # KiB: 256 MiB
_PG_PLANNER_OFF = ("enable_hashjoin", "enable_mergejoin", "enable_seqscan")
_ACTIVATED = ProfileStatus.ACTIVATED.value
# A patient of the batch whose values or links differ from the file's.
_FIELDS_DIFFER = " OR ".join(
    f"p.{c} {{differs}} {'{birth}' if c == 'birth_date' else 'b.' + c}" for c in _DATA_COLUMNS
)
# Its links differ: a wanted link is missing (or has another role), or a
# link it has is not wanted.
_LINKS_DIFFER = """(
    EXISTS (SELECT 1 FROM import_links AS bl WHERE bl.ins = b.ins AND NOT EXISTS (
        SELECT 1 FROM patient_links AS l JOIN patients AS a ON a.id = l.adult_id
        WHERE l.patient_id = p.id AND a.ins = bl.adult AND l.role = bl.role))
    OR EXISTS (SELECT 1 FROM patient_links AS l JOIN patients AS a ON a.id = l.adult_id
        WHERE l.patient_id = p.id AND NOT EXISTS (
            SELECT 1 FROM import_links AS bl
            WHERE bl.ins = b.ins AND bl.adult = a.ins AND bl.role = l.role)))"""
_CHANGED = f"""
INSERT INTO import_changed (id, ins, old_status, links)
SELECT p.id, b.ins, p.status, CASE WHEN {_LINKS_DIFFER} THEN 1 ELSE 0 END
FROM import_rows AS b JOIN patients AS p ON p.ins = b.ins
WHERE {_FIELDS_DIFFER} OR {_LINKS_DIFFER}
"""  # noqa: S608
_STATUS_CHANGES = """
SELECT c.id, c.old_status, b.status
FROM import_changed AS c JOIN import_rows AS b ON b.ins = c.ins
WHERE c.old_status <> b.status
ORDER BY b.line
"""
# DOMAIN.md 3 / notify: a new address deserves a new try, so email_invalid
# is kept only while both addresses stay; activated_at is the first activation.
_UPDATE = f"""
UPDATE patients AS p SET
    {", ".join(f"{c} = {'{birth}' if c == 'birth_date' else 'b.' + c}" for c in _DATA_COLUMNS)},
    email_invalid = CASE WHEN p.activation_email {{same}} b.activation_email
        AND p.insurer_email {{same}} b.insurer_email THEN p.email_invalid ELSE {{false}} END,
    updated_at = {{at}},
    activated_at = CASE WHEN b.status = '{_ACTIVATED}' AND p.activated_at IS NULL
        THEN {{at}} ELSE p.activated_at END
FROM import_changed AS c JOIN import_rows AS b ON b.ins = c.ins
WHERE p.id = c.id
"""  # noqa: S608
_INSERT = f"""
INSERT INTO patients (ins, {", ".join(_DATA_COLUMNS)}, email_invalid, created_at, updated_at,
                      activated_at)
SELECT b.ins, {", ".join("{birth}" if c == "birth_date" else "b." + c for c in _DATA_COLUMNS)},
       {{false}}, {{at}}, {{at}}, CASE WHEN b.status = '{_ACTIVATED}' THEN {{at}} END
FROM import_rows AS b
WHERE NOT EXISTS (SELECT 1 FROM patients AS p WHERE p.ins = b.ins)
ORDER BY b.line
"""  # noqa: S608
_DELETE_LINKS = """
DELETE FROM patient_links
WHERE patient_id IN (SELECT id FROM import_changed WHERE links = 1)
AND NOT EXISTS (
    SELECT 1 FROM import_changed AS c
    JOIN import_links AS bl ON bl.ins = c.ins
    JOIN patients AS a ON a.ins = bl.adult
    WHERE c.id = patient_links.patient_id AND a.id = patient_links.adult_id)
"""
_UPDATE_LINKS = """
UPDATE patient_links AS l SET role = bl.role
FROM import_links AS bl
JOIN patients AS p ON p.ins = bl.ins
JOIN patients AS a ON a.ins = bl.adult
WHERE l.patient_id = p.id AND l.adult_id = a.id AND l.role <> bl.role
"""
_INSERT_LINKS = """
INSERT INTO patient_links (patient_id, adult_id, role, created_at)
SELECT p.id, a.id, bl.role, {at}
FROM import_links AS bl
JOIN patients AS p ON p.ins = bl.ins
JOIN patients AS a ON a.ins = bl.adult
WHERE NOT EXISTS (
    SELECT 1 FROM patient_links AS l WHERE l.patient_id = p.id AND l.adult_id = a.id)
ORDER BY bl.line, bl.ord
"""


def _processor(dialect: Dialect, column: str) -> Callable[[Any], Any]:
    """The column's bind processor: a value in the form the driver is given."""
    processor = _PATIENTS.c[column].type.dialect_impl(dialect).bind_processor(dialect)
    return processor if processor is not None else _same


def _same(value: _T) -> _T:
    return value


async def _write_staged(
    sessions: async_sessionmaker[AsyncSession],
    staging: _Staging,
    rows: int,
    *,
    clock: Clock,
    actor: str,
    batch_size: int,
    progress: Callable[[int], None] | None,
) -> _Counts:
    """Second pass: the valid staged rows in transactions of ``batch_size`` rows.

    One connection of the writer engine is held for the whole pass (its
    temporary tables live as long as it); each batch is one transaction
    begun the engine's way (db.py: ``BEGIN IMMEDIATE``, the writer lock).
    """
    engine = sessions.kw["bind"]
    counts = _Counts()
    done = 0  # rows of the file covered by the batches written
    async with engine.connect() as conn:
        batches = _Batches(conn, staging)
        try:
            await batches.open()
            batch: list[Any] = []
            # No statement stays open on the staging database between batches:
            # SQLite could not commit a transaction that attached it meanwhile.
            while batch := staging.db.execute(
                "SELECT line, n FROM rows WHERE ok = 1 AND line > ? ORDER BY line LIMIT ?",
                (batch[-1][0] if batch else 0, batch_size),
            ).fetchall():
                async with AsyncSession(bind=conn) as session, session.begin():
                    written, later = await batches.write(
                        session,
                        batch[0][0],
                        batch[-1][0],
                        len(batch),
                        at=clock.now(),
                        actor=actor,
                    )
                if later:  # the staging database is free again: the batch committed
                    staging.db.executemany("INSERT INTO later VALUES (?)", ((n,) for n in later))
                counts.created += written.created
                counts.updated += written.updated
                counts.unchanged += written.unchanged
                last = rows if len(batch) < batch_size else batch[-1][1]
                if progress is not None and last > done:
                    progress(last - done)
                done = last
            if progress is not None and rows > done:
                progress(rows - done)

            # Adults named before their own row: every patient is written now.
            chunk: list[Any] = []
            while chunk := staging.db.execute(
                "SELECT DISTINCT line FROM later WHERE line > ? ORDER BY line LIMIT ?",
                (chunk[-1][0] if chunk else 0, min(batch_size, _STAGING_IN)),
            ).fetchall():
                async with conn.begin():
                    await batches.link_later([line for (line,) in chunk], at=clock.now())
            await batches.close()
        except BaseException:
            # The temporary tables and the attached file must not stay on a
            # pooled connection.
            await conn.invalidate()
            raise
    return counts


async def _existing(sessions: async_sessionmaker[AsyncSession], ins: set[str]) -> set[str]:
    """Which of these INS are already in the directory (a short transaction of its own)."""
    if not ins:
        return set()
    found: set[str] = set()
    async with sessions() as session:
        for chunk in _chunks(sorted(ins), _IN_CHUNK):
            query = select(_PATIENTS.c.ins).where(_PATIENTS.c.ins.in_(chunk))
            found.update(await session.scalars(query))
    return found


def _chunks(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
