"""The patient directory: look-ups for routing, changes for the CLI and admin.

Reads use their own short sessions (they never wait for the writer on
SQLite WAL); changes are writer jobs and are audited.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import date, datetime

from sqlalchemy import bindparam, select
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from mssante.routing.recipient import DirectoryEntry
from mssante.store import audit
from mssante.store.keys import Keyring
from mssante.store.models import LinkRole, Patient, PatientLink, ProfileStatus


class Directory:
    """RCPT-time look-ups: one indexed point read per recipient.

    On PostgreSQL through the async engine's pool (asyncpg is native
    asyncio).  On SQLite through one plain ``sqlite3`` connection used on
    the event loop: the read takes some ten microseconds and never waits
    for the writer (WAL), while going through aiosqlite costs several
    thread hand-offs per query and, under load, new connections and their
    threads: more than the look-up itself (BENCHMARKS.md).
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._sqlite_path = engine.url.database if engine.dialect.name == "sqlite" else None
        self._sqlite: sqlite3.Connection | None = None

    async def lookup(self, ins: str) -> DirectoryEntry | None:
        if self._sqlite_path is not None:
            row = self._sqlite_lookup(ins)
        else:
            async with self._engine.connect() as conn:
                row = (await conn.execute(_LOOKUP, {"ins": ins})).first()
        if row is None:
            return None
        return DirectoryEntry(patient_id=row[0], status=ProfileStatus(row[1]))

    def _sqlite_lookup(self, ins: str) -> tuple[int, str] | None:
        if self._sqlite is None:
            assert self._sqlite_path is not None
            conn = sqlite3.connect(self._sqlite_path, check_same_thread=False)
            conn.execute("PRAGMA query_only = ON")
            conn.execute("PRAGMA busy_timeout = 1000")
            # A directory of millions of patients: the index pages are read
            # through the OS page cache without a system call per page, and
            # SQLite keeps the hot ones (64 MiB, the default is 2 MiB).
            conn.execute("PRAGMA mmap_size = 1073741824")
            conn.execute("PRAGMA cache_size = -65536")
            self._sqlite = conn
        row: tuple[int, str] | None = self._sqlite.execute(_SQLITE_LOOKUP, (ins,)).fetchone()
        return row

    def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
            self._sqlite = None


_LOOKUP = select(Patient.id, Patient.status).where(Patient.ins == bindparam("ins"))
# The same statement, compiled once for the stdlib driver (qmark style).
_SQLITE_LOOKUP = str(_LOOKUP.compile(dialect=sqlite_dialect()))


@dataclass(frozen=True, slots=True)
class PatientRecord:
    """One patient as given by an import file or the admin interface."""

    ins: str
    status: ProfileStatus
    activation_email: str | None = None
    insurer_email: str | None = None
    given_name: str | None = None
    family_name: str | None = None
    birth_date: date | None = None
    postal_address: str | None = None
    representatives: tuple[str, ...] = ()
    helpers: tuple[str, ...] = ()


async def get_patient(session: AsyncSession, ins: str) -> Patient | None:
    return await session.scalar(select(Patient).where(Patient.ins == ins))


async def upsert_patient(
    session: AsyncSession, record: PatientRecord, *, at: datetime, actor: str
) -> Patient:
    """Create or update one patient (links are set by :func:`set_links`)."""
    patient = await get_patient(session, record.ins)
    fields = {
        "status": record.status,
        # Lower-case: the webmail logs in by it (store/credentials.py).
        "activation_email": record.activation_email and record.activation_email.lower(),
        "insurer_email": record.insurer_email,
        "given_name": record.given_name,
        "family_name": record.family_name,
        "birth_date": record.birth_date,
        "postal_address": record.postal_address,
    }
    if patient is None:
        patient = Patient(
            ins=record.ins,
            email_invalid=False,
            created_at=at,
            updated_at=at,
            activated_at=at if record.status is ProfileStatus.ACTIVATED else None,
            **fields,
        )
        session.add(patient)
        await session.flush()
        await audit.append(
            session,
            at=at,
            kind="patient.created",
            actor=actor,
            patient_id=patient.id,
            details={"status": record.status.value},
        )
        return patient
    changed = sorted(k for k, v in fields.items() if getattr(patient, k) != v)
    if changed:
        old_status = patient.status
        for key, value in fields.items():
            setattr(patient, key, value)
        if {"activation_email", "insurer_email"} & set(changed):
            # A new address has not bounced (notify/bounces.py), as in patient_import.
            patient.email_invalid = False
        patient.updated_at = at
        if record.status is ProfileStatus.ACTIVATED and patient.activated_at is None:
            patient.activated_at = at
        await audit.append(
            session,
            at=at,
            kind="patient.updated",
            actor=actor,
            patient_id=patient.id,
            details={"fields": changed, "status": [old_status.value, record.status.value]},
        )
    return patient


async def set_links(
    session: AsyncSession, patient: Patient, record: PatientRecord, *, at: datetime
) -> None:
    """Make the patient's links exactly those of the record."""
    wanted: dict[str, LinkRole] = {ins: LinkRole.HELPER for ins in record.helpers}
    wanted.update({ins: LinkRole.REPRESENTATIVE for ins in record.representatives})
    adults = {
        p.ins: p for p in await session.scalars(select(Patient).where(Patient.ins.in_(wanted)))
    }
    missing = set(wanted) - set(adults)
    if missing:
        raise LookupError(f"linked profiles not in the directory: {sorted(missing)}")
    existing = {
        link.adult_id: link
        for link in await session.scalars(
            select(PatientLink).where(PatientLink.patient_id == patient.id)
        )
    }
    keep: set[int] = set()
    for ins, role in wanted.items():
        adult = adults[ins]
        keep.add(adult.id)
        link = existing.get(adult.id)
        if link is None:
            session.add(
                PatientLink(patient_id=patient.id, adult_id=adult.id, role=role, created_at=at)
            )
        elif link.role is not role:
            link.role = role
    for adult_id, link in existing.items():
        if adult_id not in keep:
            await session.delete(link)
    await session.flush()


async def erase_patient(session: AsyncSession, ins: str, *, at: datetime, actor: str) -> bool:
    """Crypto-shred a closed or opposed profile: destroy its data key (audited).

    Messages stored for this patient become unreadable at once; the same
    message stays readable for its other recipients, who hold their own
    copy of its key.
    """
    patient = await get_patient(session, ins)
    if patient is None:
        raise LookupError("patient not found")
    if patient.status.accepts_mail:
        raise ValueError(f"profile is {patient.status.value}: close it before erasing")
    had_key = await Keyring.destroy(session, patient.id, at=at)
    await audit.append(
        session,
        at=at,
        kind="patient.erased",
        actor=actor,
        patient_id=patient.id,
        details={"data_key_destroyed": had_key},
    )
    return had_key
