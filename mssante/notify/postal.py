"""Postal activity statements: one letter per person and period (DOMAIN.md 3).

A batch takes the pending postal notifications created in a period (rows
with ``channel = postal``, ``status = pending``, no ``letter_id``), groups
them by the person told (``recipient_id``: the patient, or a minor's legal
representative) and, for each person:

1. reads what the letter needs in a read session: the address block, the
   sender's display name of each message (sealed metadata, through the
   mailbox owner's keys), the child's given name for a minor's mailbox;
2. renders the PDF (letter.py) outside any transaction;
3. in one writer transaction: checks the rows are still pending, adds the
   ``postal_letters`` row, writes ``<letter id>.pdf`` durably (temporary
   file, fsync, rename, fsync directory: durable.py), marks the rows sent
   with their ``letter_id`` and appends a ``notification.postal`` audit
   event; then commits.

So after a crash a letter is either recorded with its file, or not recorded
at all and its rows still pending: the next run makes it again.  What a
crash can leave is a PDF without a row (written, commit lost).  It is never
in a manifest; on SQLite the next letter may take the same id and replace
it, on PostgreSQL ids are not reused and it stays: the summary counts such
files ("orphans") in the output directory and they must not be printed.

The manifest (``manifest.csv``, for the print provider) is written at the
end from the batch's letters: file, names, address lines, pages, number of
events; never anything of a message.  Running the batch again with the
same ``batch`` name completes an interrupted batch and rewrites its
manifest with all its letters.  Running the period again finds nothing
pending, so no letter is made twice.

The period is in Europe/Paris time (letters are for French patients): the
month 2026-11 is [2026-11-01 00:00, 2026-12-01 00:00) in Paris, i.e.
[2026-10-31 23:00 UTC, 2026-11-30 23:00 UTC).  A message received at 23:30
Paris time on 30 November is in November's letter.

Recipients without a postal address are skipped (rows stay pending) and
reported by their INS pseudonym only.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

from sqlalchemy import ColumnElement, select
from sqlalchemy.ext.asyncio import AsyncSession

from mssante.clock import Clock
from mssante.durable import write_file
from mssante.french import PARIS
from mssante.notify.letter import (
    Access,
    Letter,
    LetterEvent,
    RenderedLetter,
    count_pages,
    render,
)
from mssante.store import audit
from mssante.store.db import SessionMaker
from mssante.store.keys import KeyDestroyedError, Keyring
from mssante.store.models import (
    Channel,
    Delivery,
    Message,
    Notification,
    NotificationStatus,
    Patient,
    PostalLetter,
    ProfileStatus,
)
from mssante.store.reading import message_key, view

log = logging.getLogger(__name__)

AUDIT_KIND = "notification.postal"
MANIFEST = "manifest.csv"
MANIFEST_ADDRESS_LINES = 6
MANIFEST_COLUMNS = (
    "file",
    "letter",
    "recipient_name",
    *(f"address_{i}" for i in range(1, MANIFEST_ADDRESS_LINES + 1)),
    "pages",
    "events",
)
_BATCH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MONTH = re.compile(r"(\d{4})-(\d{2})")
# Attempts at one person's letter when their rows change meanwhile.
_ATTEMPTS = 3
# Bind parameters per IN (...), far below SQLite's and PostgreSQL's limits.
_IN_CHUNK = 5000


class BatchError(Exception):
    """A batch that cannot run as asked (the message says why)."""


# --- the period (pure) ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Period:
    """Calendar days ``start`` to ``end`` inclusive, in Europe/Paris time."""

    start: date
    end: date

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise ValueError(f"period ends ({self.end}) before it starts ({self.start})")

    @classmethod
    def month(cls, text: str) -> Period:
        """``YYYY-MM``: that whole month."""
        m = _MONTH.fullmatch(text.strip())
        if m is None or not 1 <= int(m.group(2)) <= 12:
            raise ValueError(f"not a month: {text!r} (expected YYYY-MM)")
        year, month = int(m.group(1)), int(m.group(2))
        following = date(year + 1, 1, 1) if month == 12 else date(year, month + 1, 1)
        return cls(date(year, month, 1), following - timedelta(days=1))

    @property
    def is_month(self) -> bool:
        nxt = self.end + timedelta(days=1)
        return (
            self.start.day == 1
            and nxt.day == 1
            and (self.end.month, self.end.year)
            == (
                self.start.month,
                self.start.year,
            )
        )

    @property
    def label(self) -> str:
        if self.is_month:
            return f"{self.start:%Y-%m}"
        return f"{self.start:%Y-%m-%d}_{self.end:%Y-%m-%d}"

    def bounds(self) -> tuple[datetime, datetime]:
        """The period as UTC instants, [start, end)."""
        start = datetime.combine(self.start, time(), PARIS)
        end = datetime.combine(self.end + timedelta(days=1), time(), PARIS)
        return start.astimezone(UTC), end.astimezone(UTC)

    def contains(self, at: datetime) -> bool:
        start, end = self.bounds()
        return start <= at < end


def parse_period(month: str | None, since: date | None, until: date | None) -> Period:
    """``--period YYYY-MM``, or ``--since``/``--until`` (inclusive days)."""
    if month is not None:
        if since is not None or until is not None:
            raise ValueError("give either a month or since/until, not both")
        return Period.month(month)
    if since is None or until is None:
        raise ValueError("give a month (YYYY-MM) or both since and until")
    return Period(since, until)


def default_batch_name(period: Period, now: datetime) -> str:
    return f"{period.label}-{now.astimezone(UTC):%Y%m%dT%H%M%SZ}"


def check_batch_name(name: str) -> str:
    if not _BATCH_NAME.fullmatch(name):
        raise ValueError(
            f"batch name {name!r}: 1 to 64 letters, digits, '.', '_' or '-', "
            "not starting with a punctuation mark"
        )
    return name


# --- the address block (pure) ---------------------------------------------------------------


def _fold(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def recipient_name(given_name: str | None, family_name: str | None) -> str:
    return " ".join(p.strip() for p in (given_name, family_name) if p and p.strip())


def address_block(
    given_name: str | None, family_name: str | None, postal_address: str | None
) -> tuple[str, ...] | None:
    """The recipient block of the envelope window, or None without an address.

    ``patients.postal_address`` holds the block as La Poste wants it, the
    name line first (as the import and the demo data hold it); when its first
    line does not carry the family name, the name is put in front.
    """
    lines = tuple(line.strip() for line in (postal_address or "").split("\n") if line.strip())
    if not lines:
        return None
    name = recipient_name(given_name, family_name)
    family = (family_name or "").strip()
    if name and family and _fold(family) not in _fold(lines[0]):
        return (name, *lines)
    return lines


# --- the batch --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LetterStyle:
    """What every letter of a batch says about the service."""

    service_name: str
    service_address: tuple[str, ...]
    webmail_url: str
    activation_url: str


@dataclass(frozen=True, slots=True)
class ManifestRow:
    letter_id: int
    file_name: str
    name: str
    address: tuple[str, ...]
    pages: int
    events: int

    def csv_row(self) -> list[str]:
        lines = list(self.address[:MANIFEST_ADDRESS_LINES])
        if len(self.address) > MANIFEST_ADDRESS_LINES:  # NF Z10-011 allows six lines
            lines[-1] = ", ".join(self.address[MANIFEST_ADDRESS_LINES - 1 :])
        lines += [""] * (MANIFEST_ADDRESS_LINES - len(lines))
        return [
            self.file_name,
            str(self.letter_id),
            self.name,
            *lines,
            str(self.pages),
            str(self.events),
        ]


@dataclass
class PostalReport:
    batch: str
    period: Period
    out_dir: Path
    letters: int = 0  # made by this run
    events: int = 0  # notifications they listed
    skipped: list[str] = field(default_factory=list)  # INS pseudonyms, no postal address
    changed: int = 0  # people whose rows kept changing during the run: left pending
    manifest: Path | None = None
    manifest_letters: int = 0  # letters of the whole batch in the manifest
    orphans: list[str] = field(default_factory=list)  # PDF files with no letter row


@dataclass(frozen=True, slots=True)
class _Prepared:
    ids: tuple[int, ...]
    mailboxes: tuple[int, ...]
    name: str
    address: tuple[str, ...]
    rendered: RenderedLetter


@dataclass(frozen=True, slots=True)
class _NoAddress:
    pseudonym: str


Progress = Callable[[int, int], None]  # (done, total)


def _pending(period: Period) -> list[ColumnElement[bool]]:
    start, end = period.bounds()
    return [
        Notification.channel == Channel.POSTAL,
        Notification.status == NotificationStatus.PENDING,
        Notification.letter_id.is_(None),
        Notification.created_at >= start,
        Notification.created_at < end,
    ]


async def pending_recipients(reads: SessionMaker, period: Period) -> list[int]:
    """Who has postal notifications waiting in ``period``."""
    async with reads() as session:
        rows = await session.scalars(
            select(Notification.recipient_id)
            .where(*_pending(period))
            .distinct()
            .order_by(Notification.recipient_id)
        )
        return list(rows)


async def _sender_name(
    session: AsyncSession, keyring: Keyring, delivery: Delivery, cache: dict[int, str | None]
) -> str | None:
    """The From display name, read through the mailbox owner's keys.

    Only the name: DOMAIN.md 3 says a notification tells from whom at most,
    and DOMAIN.md 4 that the patient never sees the professional's address.
    """
    if delivery.message_id in cache:
        return cache[delivery.message_id]
    message = await session.get(Message, delivery.message_id)
    name = None
    if message is not None:
        try:
            key = await message_key(session, keyring, message, delivery.patient_id)
        except KeyDestroyedError:  # erased profile: the name is gone too
            key = None
        if key is not None:
            name = view(message, key).from_name
    cache[delivery.message_id] = name
    return name


async def _prepare(
    reads: SessionMaker,
    keyring: Keyring,
    recipient_id: int,
    period: Period,
    *,
    style: LetterStyle,
    today: date,
    pseudonym: Callable[[str], str],
) -> _Prepared | _NoAddress | None:
    async with reads() as session:
        person = await session.get(Patient, recipient_id)
        if person is None:  # deleted meanwhile (its rows cascade)
            return None
        rows = list(
            await session.scalars(
                select(Notification)
                .where(Notification.recipient_id == recipient_id, *_pending(period))
                .order_by(Notification.created_at, Notification.id)
            )
        )
        if not rows:
            return None
        address = address_block(person.given_name, person.family_name, person.postal_address)
        if address is None:
            return _NoAddress(pseudonym(person.ins))
        names: dict[int, str | None] = {}
        children: dict[int, str] = {}
        events = []
        for row in rows:
            delivery = await session.get(Delivery, row.delivery_id)
            sender = None
            if delivery is not None:
                sender = await _sender_name(session, keyring, delivery, names)
            child = None
            if row.patient_id != recipient_id:
                # A minor's mailbox, told to this representative (planner.py):
                # named by the child's given name only, nothing medical.
                if row.patient_id not in children:
                    minor = await session.get(Patient, row.patient_id)
                    children[row.patient_id] = ((minor and minor.given_name) or "").strip()
                child = children[row.patient_id]
            events.append(LetterEvent(at=row.created_at, sender=sender, child=child))
        letter = Letter(
            service_name=style.service_name,
            service_address=style.service_address,
            recipient=address,
            date=today,
            period_start=period.start,
            period_end=period.end,
            events=tuple(events),
            access=Access.LOG_IN if person.status is ProfileStatus.ACTIVATED else Access.ACTIVATE,
            webmail_url=style.webmail_url,
            activation_url=style.activation_url,
        )
        ids = tuple(r.id for r in rows)
        mailboxes = tuple(sorted({r.patient_id for r in rows}))
        name = recipient_name(person.given_name, person.family_name) or address[0]
    rendered = await asyncio.to_thread(render, letter)
    return _Prepared(ids, mailboxes, name, address, rendered)


async def _record(
    writes: SessionMaker,
    prepared: _Prepared,
    recipient_id: int,
    *,
    period: Period,
    batch: str,
    out_dir: Path,
    now: datetime,
    actor: str,
) -> PostalLetter | None:
    """Record one letter and write its file, in one transaction; None if its rows changed."""
    async with writes() as session, session.begin():
        rows = list(
            await session.scalars(
                select(Notification).where(
                    Notification.id.in_(prepared.ids),
                    Notification.status == NotificationStatus.PENDING,
                    Notification.letter_id.is_(None),
                )
            )
        )
        still = await session.scalars(
            select(Notification.id).where(
                Notification.recipient_id == recipient_id, *_pending(period)
            )
        )
        if len(rows) != len(prepared.ids) or set(still) != set(prepared.ids):
            return None  # another run took them, or new ones came: render again
        letter = PostalLetter(
            recipient_id=recipient_id,
            period_start=period.start,
            period_end=period.end,
            batch=batch,
            file_name="",
            events=len(rows),
            created_at=now,
        )
        session.add(letter)
        await session.flush()
        letter.file_name = f"{letter.id}.pdf"  # no INS, no name in file names
        # The file is durable before the commit that says it exists.
        await asyncio.to_thread(write_file, out_dir / letter.file_name, prepared.rendered.pdf)
        for row in rows:
            row.status = NotificationStatus.SENT
            row.sent_at = now
            row.letter_id = letter.id
        await audit.append(
            session,
            at=now,
            kind=AUDIT_KIND,
            actor=actor,
            patient_id=recipient_id,
            details={
                "letter": letter.id,
                "batch": batch,
                "period": [period.start.isoformat(), period.end.isoformat()],
                "events": len(rows),
                "notifications": sorted(prepared.ids),
                "mailboxes": list(prepared.mailboxes),
            },
        )
    return letter


async def run_batch(
    reads: SessionMaker,
    writes: SessionMaker,
    keyring: Keyring,
    *,
    period: Period,
    out_dir: Path,
    batch: str,
    clock: Clock,
    style: LetterStyle,
    pseudonym: Callable[[str], str],
    actor: str = "postal-batch",
    progress: Progress | None = None,
) -> PostalReport:
    """Make the letters of ``period`` into ``out_dir``; see the module docstring."""
    check_batch_name(batch)
    report = PostalReport(batch=batch, period=period, out_dir=out_dir)
    async with reads() as session:
        earlier = await session.scalar(
            select(PostalLetter).where(PostalLetter.batch == batch).limit(1)
        )
    if earlier is not None and (earlier.period_start, earlier.period_end) != (
        period.start,
        period.end,
    ):
        raise BatchError(
            f"batch {batch} is for {earlier.period_start}..{earlier.period_end}, not {period.label}"
        )
    recipients = await pending_recipients(reads, period)
    total = len(recipients)
    if progress is not None:
        progress(0, total)
    made: dict[int, ManifestRow] = {}
    for done, recipient_id in enumerate(recipients, start=1):
        for _ in range(_ATTEMPTS):
            now = clock.now()
            prepared = await _prepare(
                reads,
                keyring,
                recipient_id,
                period,
                style=style,
                today=now.astimezone(PARIS).date(),
                pseudonym=pseudonym,
            )
            if prepared is None:
                break
            if isinstance(prepared, _NoAddress):
                log.warning("postal batch %s: no postal address for %s", batch, prepared.pseudonym)
                report.skipped.append(prepared.pseudonym)
                break
            await asyncio.to_thread(out_dir.mkdir, mode=0o700, parents=True, exist_ok=True)
            letter = await _record(
                writes,
                prepared,
                recipient_id,
                period=period,
                batch=batch,
                out_dir=out_dir,
                now=now,
                actor=actor,
            )
            if letter is not None:
                report.letters += 1
                report.events += letter.events
                made[letter.id] = ManifestRow(
                    letter.id,
                    letter.file_name,
                    prepared.name,
                    prepared.address,
                    prepared.rendered.pages,
                    letter.events,
                )
                break
        else:
            report.changed += 1
        if progress is not None:
            progress(done, total)
    if made or earlier is not None:
        await _write_manifest(reads, report, made)
    report.orphans = await _orphans(reads, out_dir)
    return report


async def _write_manifest(
    reads: SessionMaker, report: PostalReport, made: dict[int, ManifestRow]
) -> None:
    """The print provider's list: every letter of the batch, this run's and earlier runs'."""
    async with reads() as session:
        letters = (
            await session.execute(
                select(PostalLetter, Patient)
                .join(Patient, Patient.id == PostalLetter.recipient_id)
                .where(PostalLetter.batch == report.batch)
                .order_by(PostalLetter.id)
            )
        ).all()
    rows = []
    for letter, person in letters:
        row = made.get(letter.id)
        if row is None:
            # Made by an interrupted run of this batch: the address as it is now.
            path = report.out_dir / letter.file_name
            try:
                pdf = await asyncio.to_thread(path.read_bytes)
            except FileNotFoundError:
                raise BatchError(
                    f"{path}: letter {letter.id} of batch {report.batch} is not there; "
                    "give the batch's own output directory (--out)"
                ) from None
            address = address_block(person.given_name, person.family_name, person.postal_address)
            row = ManifestRow(
                letter.id,
                letter.file_name,
                recipient_name(person.given_name, person.family_name) or (address or ("",))[0],
                address or (),
                count_pages(pdf),
                letter.events,
            )
        rows.append(row)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")  # RFC 4180
    writer.writerow(MANIFEST_COLUMNS)
    for row in rows:
        writer.writerow(row.csv_row())
    report.manifest = report.out_dir / MANIFEST
    report.manifest_letters = len(rows)
    await asyncio.to_thread(report.out_dir.mkdir, mode=0o700, parents=True, exist_ok=True)
    await asyncio.to_thread(write_file, report.manifest, out.getvalue().encode())


async def _orphans(reads: SessionMaker, out_dir: Path) -> list[str]:
    """PDF files of ``out_dir`` that no letter row names (a crash before a commit)."""
    files = await asyncio.to_thread(lambda: {p.name for p in out_dir.glob("*.pdf")})
    if not files:
        return []
    ids = sorted(int(n.removesuffix(".pdf")) for n in files if n.removesuffix(".pdf").isdigit())
    known: set[str] = set()
    async with reads() as session:
        for i in range(0, len(ids), _IN_CHUNK):
            chunk = ids[i : i + _IN_CHUNK]
            known.update(
                await session.scalars(
                    select(PostalLetter.file_name).where(PostalLetter.id.in_(chunk))
                )
            )
    return sorted(files - known)
