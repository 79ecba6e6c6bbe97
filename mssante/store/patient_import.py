"""Importing the patient directory from a file (``mssante patients import FILE``).

The file is CSV (header row, UTF-8, ``,``) or JSON Lines, with the fields
of :data:`FIELDS`.  It may hold millions of rows, so it is read twice
instead of being held in memory:

1. every row is checked and *all* problems are collected, each with its
   physical line number; representatives and helpers must be in the file
   (earlier or later) or already in the directory;
2. if nothing is wrong (or ``skip_invalid``), the valid rows are written in
   transactions of ``batch_size`` rows with Core bulk statements: one
   SELECT of the batch's INS, an executemany INSERT of the new patients, an
   executemany UPDATE of the changed ones, the links, the audit events.

What stays in memory is the INS of every row (duplicates and references are
checked against it), the errors, and the references to adults that come
later in the file.  Re-importing the same file changes nothing
(idempotent upsert keyed on the INS).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import IO, Any, NamedTuple, TypeVar, cast

from email_validator import EmailNotValidError, validate_email
from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES
from sqlalchemy import Table, bindparam, delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mssante.clock import Clock
from mssante.routing.ins import InsError, parse_ins
from mssante.store import audit
from mssante.store.models import LinkRole, Patient, PatientLink, ProfileStatus

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
_LINKS = cast(Table, PatientLink.__table__)

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

    Raises ``ValueError`` for an unknown format and ``RuntimeError`` if the
    file changes between the check and the write.
    """
    kind = file_format(path, fmt)
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    before = _version(path)
    parser = _RowParser()
    try:
        check = await _check_file(sessions, path, kind, parser, batch_size)
    except _HeaderError as exc:
        return ImportReport(0, 0, 0, 0, [RowError(1, str(exc))], imported=False)
    errors = [RowError(line, "; ".join(reasons)) for line, reasons in sorted(check.errors.items())]
    valid_rows = check.rows - len(errors)
    if errors and (not skip_invalid or valid_rows == 0):
        return ImportReport(check.rows, 0, 0, 0, errors, imported=False)

    if _version(path) != before:
        raise RuntimeError(f"{path} changed while it was being imported")
    counts = await _write_file(
        sessions,
        path,
        kind,
        parser,
        set(check.errors),
        clock=clock,
        actor=actor,
        batch_size=batch_size,
        progress=progress,
    )
    return ImportReport(
        check.rows, counts.created, counts.updated, counts.unchanged, errors, imported=True
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


def _version(path: Path) -> tuple[int, int]:
    """Size and modification time: the file must not change between the two passes."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


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
            yield start, dict(zip(header, values, strict=True))


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

    def parse(self, raw: Mapping[str, Any], *, from_csv: bool) -> _Parsed:
        problems: list[str] = []
        if not from_csv:  # the CSV header was checked once
            problems += [f"unknown key {key!r}" for key in raw if key not in FIELDS]
        get = raw.get
        ins = self._ins(get("ins"), problems)
        status = self._status(get("status"), problems)
        activation_email = self._email_field("activation_email", get("activation_email"), problems)
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
        known = self._dates.get(text)
        if known is not None:
            return known
        if _DATE.fullmatch(text):
            try:
                known = date.fromisoformat(text)
            except ValueError:
                pass
            else:
                if len(self._dates) >= self._MAX_DATES:
                    self._dates.clear()
                self._dates[text] = known
                return known
        problems.append(f"birth_date: {text!r} is not a date (YYYY-MM-DD)")
        return None


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
        if from_csv and ("|" in value or "\\" in value or "\n" in value):
            lines: list[Any] = _CSV_ADDRESS_BREAK.split(value)
        elif not from_csv and "\n" in value:
            lines = value.splitlines()
        else:
            lines = [value]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        lines = value
    else:
        problems.append("postal_address: must be a string or a list of strings")
        return None
    text = "\n".join(stripped for line in lines if (stripped := line.strip()))
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


# --- First pass: check the whole file --------------------------------------


class _Ref(NamedTuple):
    line: int
    ins: str | None  # the row's own INS
    field: str
    adult: str


class _Check:
    """All errors of the file; what is kept is bounded by the INS of the file."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], batch_size: int) -> None:
        self._sessions = sessions
        self._batch_size = batch_size
        self.rows = 0
        self.errors: dict[int, list[str]] = {}
        self.first_line: dict[str, int] = {}  # INS -> line of its first row
        self.rejected: set[str] = set()  # INS whose first row is invalid
        self._unchecked: list[_Ref] = []  # adult neither valid in the file so far nor looked up
        self._later: list[_Ref] = []  # adult not in the database: must come later in the file

    def fail(self, line: int, reason: str) -> None:
        self.errors.setdefault(line, []).append(reason)

    def usable(self, ins: str) -> bool:
        return ins in self.first_line and ins not in self.rejected

    def row(self, line: int, parsed: _Parsed) -> bool:
        """Check one parsed row; True when the references waiting should be looked up."""
        self.rows += 1
        problems = parsed.problems
        first = None
        if parsed.ins is not None:
            first = self.first_line.setdefault(parsed.ins, line)
            if first != line:
                problems = [*problems, f"ins: already on line {first}"]
        if problems:
            self.fail(line, "; ".join(problems))
            if parsed.ins is not None and first == line:
                self.rejected.add(parsed.ins)
        for field, adult in parsed.links:
            if not self.usable(adult):
                self._unchecked.append(_Ref(line, parsed.ins, field, adult))
        return len(self._unchecked) >= self._batch_size

    async def look_up(self) -> None:
        """Drop the references to adults valid in the file so far or in the directory."""
        refs = [ref for ref in self._unchecked if not self.usable(ref.adult)]
        self._unchecked.clear()
        in_db = await _existing(self._sessions, {ref.adult for ref in refs})
        self._later += [ref for ref in refs if ref.adult not in in_db]

    async def finish(self, rescan: Callable[[], Iterator[tuple[int, _Parsed]]]) -> None:
        """Check the references to adults not found yet, then their consequences."""
        await self.look_up()
        newly: set[str] = set()
        for ref in self._later:
            if not self.usable(ref.adult):
                self._reject(ref, newly)
        self._later.clear()
        # A row invalid only now invalidates the rows that name it (with
        # skip_invalid they could not be linked); rare, so found by reading
        # the file again rather than by keeping every reference.
        while newly:
            newly -= await _existing(self._sessions, newly)
            if not newly:
                break
            named, newly = newly, set()
            for line, parsed in rescan():
                if line in self.errors:
                    continue
                for field, adult in parsed.links:
                    if adult in named:
                        self._reject(_Ref(line, parsed.ins, field, adult), newly)

    def _reject(self, ref: _Ref, newly: set[str]) -> None:
        if ref.adult in self.first_line:
            reason = f"{ref.adult} is on line {self.first_line[ref.adult]}, which is invalid"
        else:
            reason = f"{ref.adult} is neither in the file nor in the directory"
        self.fail(ref.line, f"{ref.field}: {reason}")
        own = ref.ins
        if own is not None and self.first_line.get(own) == ref.line and own not in self.rejected:
            self.rejected.add(own)
            newly.add(own)


async def _check_file(
    sessions: async_sessionmaker[AsyncSession],
    path: Path,
    kind: str,
    parser: _RowParser,
    batch_size: int,
) -> _Check:
    check = _Check(sessions, batch_size)
    from_csv = kind == "csv"
    with _rows(path, kind) as rows:
        for line, raw in rows:
            if isinstance(raw, str):
                check.rows += 1
                check.fail(line, raw)
            elif check.row(line, parser.parse(raw, from_csv=from_csv)):
                await check.look_up()

    def rescan() -> Iterator[tuple[int, _Parsed]]:
        with _rows(path, kind) as rows:
            for line, raw in rows:
                if not isinstance(raw, str):
                    yield line, parser.parse(raw, from_csv=from_csv)

    await check.finish(rescan)
    return check


# --- Second pass: write ----------------------------------------------------


@dataclass
class _Counts:
    created: int = 0
    updated: int = 0
    unchanged: int = 0


class _LaterLinks(NamedTuple):
    """A patient whose adults were not all written yet when its batch was."""

    ins: str
    wanted: dict[str, LinkRole]  # adult INS -> role


async def _write_file(
    sessions: async_sessionmaker[AsyncSession],
    path: Path,
    kind: str,
    parser: _RowParser,
    skip_lines: set[int],
    *,
    clock: Clock,
    actor: str,
    batch_size: int,
    progress: Callable[[int], None] | None,
) -> _Counts:
    counts = _Counts()
    later: list[_LaterLinks] = []
    batch: list[_Row] = []
    covered = 0  # rows read since progress was last told

    async def flush() -> None:
        nonlocal covered
        if batch:
            async with sessions() as session, session.begin():
                later.extend(
                    await _write_batch(session, batch, counts, at=clock.now(), actor=actor)
                )
            batch.clear()
        if progress is not None and covered:
            progress(covered)
        covered = 0

    with _rows(path, kind) as rows:
        for line, raw in rows:
            covered += 1
            if line in skip_lines:
                continue
            parsed = None if isinstance(raw, str) else parser.parse(raw, from_csv=kind == "csv")
            if parsed is None or parsed.row is None:
                raise RuntimeError(f"{path}: line {line} changed while the file was being imported")
            batch.append(parsed.row)
            if len(batch) >= batch_size:
                await flush()
        await flush()

    # Adults named before their own row: every patient is written now.
    for chunk in _chunks(later, batch_size):
        async with sessions() as session, session.begin():
            await _link_later(session, chunk, at=clock.now())
    return counts


class _Link(NamedTuple):
    id: int
    adult_ins: str
    role: LinkRole


async def _write_batch(
    session: AsyncSession,
    rows: Sequence[_Row],
    counts: _Counts,
    *,
    at: datetime,
    actor: str,
) -> list[_LaterLinks]:
    """Upsert one batch of patients and the links that can be set already."""
    p = _PATIENTS
    existing: dict[str, Any] = {}
    for chunk in _chunks([row.ins for row in rows], _IN_CHUNK):
        query = select(
            p.c.id,
            p.c.ins,
            p.c.email_invalid,
            p.c.activated_at,
            *(p.c[name] for name in _DATA_COLUMNS),
        ).where(p.c.ins.in_(chunk))
        existing.update((row.ins, row) for row in await session.execute(query))
    current = await _current_links(session, [row.id for row in existing.values()])

    new_rows: list[dict[str, Any]] = []
    changed_rows: list[dict[str, Any]] = []
    status_changes: list[tuple[int, ProfileStatus, ProfileStatus]] = []
    to_link: list[_Row] = []
    batch = _Counts()
    for row in rows:
        values = row.values
        status = values["status"]
        old = existing.get(row.ins)
        if old is None:
            batch.created += 1
            activated = status is ProfileStatus.ACTIVATED
            new_rows.append(
                values
                | {
                    "ins": row.ins,
                    "email_invalid": False,
                    "created_at": at,
                    "updated_at": at,
                    "activated_at": at if activated else None,
                }
            )
            if row.wanted:
                to_link.append(row)
            continue
        have = {link.adult_ins: link.role for link in current.get(old.id, {}).values()}
        fields_changed = any(old._mapping[name] != value for name, value in values.items())
        if not fields_changed and have == row.wanted:
            batch.unchanged += 1
            continue
        batch.updated += 1
        emails_changed = (old.activation_email, old.insurer_email) != (
            values["activation_email"],
            values["insurer_email"],
        )
        activated_at = old.activated_at
        if status is ProfileStatus.ACTIVATED and activated_at is None:
            activated_at = at
        changed_rows.append(
            values
            | {
                "_id": old.id,
                "updated_at": at,
                "activated_at": activated_at,
                # A new address deserves a new try (notify marks bounces).
                "email_invalid": old.email_invalid and not emails_changed,
            }
        )
        if old.status is not status:
            status_changes.append((old.id, old.status, status))
        if have != row.wanted:
            to_link.append(row)

    if new_rows:
        await session.execute(insert(p), new_rows)
    if changed_rows:
        await session.execute(update(p).where(p.c.id == bindparam("_id")), changed_rows)

    ids = await _ids(session, {r.ins for r in to_link} | {a for r in to_link for a in r.wanted})
    ready: list[tuple[int, dict[int, LinkRole]]] = []
    later: list[_LaterLinks] = []
    for row in to_link:
        if all(adult in ids for adult in row.wanted):
            ready.append((ids[row.ins], {ids[a]: role for a, role in row.wanted.items()}))
        else:
            later.append(_LaterLinks(row.ins, row.wanted))
    await _apply_links(session, ready, current, at=at)

    for patient_id, old_status, new_status in status_changes:
        await audit.append(
            session,
            at=at,
            kind="patient.status_changed",
            actor=actor,
            patient_id=patient_id,
            details={"from": old_status.value, "to": new_status.value},
        )
    await audit.append(
        session,
        at=at,
        kind="patients.imported",
        actor=actor,
        details={"created": batch.created, "updated": batch.updated, "unchanged": batch.unchanged},
    )
    counts.created += batch.created
    counts.updated += batch.updated
    counts.unchanged += batch.unchanged
    return later


async def _link_later(session: AsyncSession, chunk: Sequence[_LaterLinks], *, at: datetime) -> None:
    ids = await _ids(session, {item.ins for item in chunk} | {a for i in chunk for a in i.wanted})
    missing = sorted({a for item in chunk for a in (item.ins, *item.wanted)} - set(ids))
    if missing:
        # Checked before writing: only a concurrent change gets here.
        raise LookupError(f"profiles removed during the import: {', '.join(missing)}")
    current = await _current_links(session, [ids[item.ins] for item in chunk])
    ready = [(ids[item.ins], {ids[a]: role for a, role in item.wanted.items()}) for item in chunk]
    await _apply_links(session, ready, current, at=at)


async def _apply_links(
    session: AsyncSession,
    wanted: Sequence[tuple[int, dict[int, LinkRole]]],
    current: Mapping[int, Mapping[int, _Link]],
    *,
    at: datetime,
) -> None:
    """Make each patient's links exactly ``wanted`` (patient id -> adult id -> role)."""
    removed: list[int] = []
    role_changes: list[dict[str, Any]] = []
    added: list[dict[str, Any]] = []
    for patient_id, adults in wanted:
        have = current.get(patient_id, {})
        removed += [link.id for adult_id, link in have.items() if adult_id not in adults]
        for adult_id, role in adults.items():
            link = have.get(adult_id)
            if link is None:
                added.append(
                    {"patient_id": patient_id, "adult_id": adult_id, "role": role, "created_at": at}
                )
            elif link.role is not role:
                role_changes.append({"_id": link.id, "role": role})
    for chunk in _chunks(removed, _IN_CHUNK):
        await session.execute(delete(_LINKS).where(_LINKS.c.id.in_(chunk)))
    if role_changes:
        await session.execute(update(_LINKS).where(_LINKS.c.id == bindparam("_id")), role_changes)
    if added:
        await session.execute(insert(_LINKS), added)


async def _current_links(
    session: AsyncSession, patient_ids: Sequence[int]
) -> dict[int, dict[int, _Link]]:
    """patient id -> adult id -> link, for these patients."""
    links: dict[int, dict[int, _Link]] = {}
    adult = _PATIENTS.alias("adult")
    for chunk in _chunks(patient_ids, _IN_CHUNK):
        query = (
            select(_LINKS.c.id, _LINKS.c.patient_id, _LINKS.c.adult_id, _LINKS.c.role, adult.c.ins)
            .join(adult, adult.c.id == _LINKS.c.adult_id)
            .where(_LINKS.c.patient_id.in_(chunk))
        )
        for row in await session.execute(query):
            links.setdefault(row.patient_id, {})[row.adult_id] = _Link(row.id, row.ins, row.role)
    return links


async def _ids(session: AsyncSession, ins: Iterable[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    for chunk in _chunks(list(ins), _IN_CHUNK):
        query = select(_PATIENTS.c.ins, _PATIENTS.c.id).where(_PATIENTS.c.ins.in_(chunk))
        found.update((row.ins, row.id) for row in await session.execute(query))
    return found


async def _existing(sessions: async_sessionmaker[AsyncSession], ins: set[str]) -> set[str]:
    """Which of these INS are already in the directory (a short transaction of its own)."""
    if not ins:
        return set()
    async with sessions() as session:
        return set(await _ids(session, ins))


def _chunks(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
