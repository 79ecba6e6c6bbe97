"""Data keys in the database, and what each key protects.

Every sealed value is bound to where it lives through its AES-GCM
associated data (the contexts below), so a value copied onto another row
does not decrypt.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from mssante.store.crypto import KeyProvider, new_key, seal, unseal
from mssante.store.models import PatientKey


class KeyDestroyedError(LookupError):
    """The patient's data key was destroyed (erased profile): nothing to read."""


def dek_context(patient_id: int) -> bytes:
    return b"mssante/dek/%d" % patient_id


def message_key_context(ref: str, patient_id: int) -> bytes:
    return b"mssante/message-key/%s/%d" % (ref.encode(), patient_id)


def message_meta_context(ref: str) -> bytes:
    return b"mssante/message-meta/" + ref.encode()


def outbound_key_context(ref: str) -> bytes:
    return b"mssante/outbound-key/" + ref.encode()


def conversation_context(patient_id: int) -> bytes:
    return b"mssante/conversation/%d" % patient_id


def seal_json(key: bytes, value: Any, context: bytes) -> bytes:
    return seal(key, json.dumps(value, separators=(",", ":")).encode(), context)


def unseal_json(key: bytes, sealed: bytes, context: bytes) -> Any:
    return json.loads(unseal(key, sealed, context))


class Keyring:
    def __init__(self, provider: KeyProvider) -> None:
        self.provider = provider

    async def data_key(
        self, session: AsyncSession, patient_id: int, *, at: datetime | None = None
    ) -> bytes:
        """The patient's data key.

        With ``at`` (writing), a key is created on first use, or anew after an
        erasure: what was stored before stays unreadable, new mail is not.
        """
        row = await session.get(PatientKey, patient_id)
        if at is not None and (row is None or row.wrapped is None):
            dek = new_key()
            master = self.provider.current()
            if row is None:
                row = PatientKey(patient_id=patient_id, rotated_at=None, destroyed_at=None)
                session.add(row)
            row.master_key_id = master.id
            row.wrapped = seal(master.key, dek, dek_context(patient_id))
            row.created_at = at
            await session.flush()
            return dek
        if row is None or row.wrapped is None or row.master_key_id is None:
            raise KeyDestroyedError(f"patient {patient_id}: data key destroyed")
        master = self.provider.get(row.master_key_id)
        return unseal(master.key, row.wrapped, dek_context(patient_id))

    async def data_keys_for_writing(
        self, session: AsyncSession, patient_ids: list[int], *, at: datetime
    ) -> dict[int, bytes]:
        """Data keys of several patients at once, created where missing (see data_key)."""
        conn = await session.connection()
        rows = {
            row.patient_id: row
            for row in await conn.execute(
                select(PatientKey.patient_id, PatientKey.master_key_id, PatientKey.wrapped).where(
                    PatientKey.patient_id.in_(patient_ids)
                )
            )
        }
        keys: dict[int, bytes] = {}
        master = self.provider.current()
        created: list[dict[str, object]] = []
        for patient_id in patient_ids:
            row = rows.get(patient_id)
            if row is not None and row.wrapped is not None and row.master_key_id is not None:
                old = self.provider.get(row.master_key_id)
                keys[patient_id] = unseal(old.key, row.wrapped, dek_context(patient_id))
                continue
            dek = keys[patient_id] = new_key()
            wrapped = seal(master.key, dek, dek_context(patient_id))
            if row is None:
                created.append(
                    {
                        "patient_id": patient_id,
                        "master_key_id": master.id,
                        "wrapped": wrapped,
                        "created_at": at,
                        "rotated_at": None,
                        "destroyed_at": None,
                    }
                )
            else:  # erased before: new mail gets a new key
                await conn.execute(
                    update(PatientKey)
                    .where(PatientKey.patient_id == patient_id)
                    .values(master_key_id=master.id, wrapped=wrapped, created_at=at)
                )
        if created:
            await conn.execute(insert(PatientKey), created)
        return keys

    async def pending_rotation(self, session: AsyncSession) -> int:
        """How many data keys are not under the current master key yet."""
        n = await session.scalar(
            select(func.count())
            .select_from(PatientKey)
            .where(
                PatientKey.wrapped.is_not(None),
                PatientKey.master_key_id != self.provider.current().id,
            )
        )
        return int(n or 0)

    async def rewrap_batch(self, session: AsyncSession, *, at: datetime, limit: int) -> int:
        """Re-wrap up to ``limit`` data keys not yet under the current master key.

        Each batch commits on its own (the caller's transaction), so an
        interrupted rotation resumes where it stopped.
        """
        current = self.provider.current()
        rows = list(
            await session.scalars(
                select(PatientKey)
                .where(
                    PatientKey.wrapped.is_not(None),
                    PatientKey.master_key_id != current.id,
                )
                .order_by(PatientKey.patient_id)
                .limit(limit)
            )
        )
        for row in rows:
            assert row.wrapped is not None and row.master_key_id is not None
            old = self.provider.get(row.master_key_id)
            context = dek_context(row.patient_id)
            dek = unseal(old.key, row.wrapped, context)
            row.wrapped = seal(current.key, dek, context)
            row.master_key_id = current.id
            row.rotated_at = at
        await session.flush()
        return len(rows)

    @staticmethod
    async def destroy(session: AsyncSession, patient_id: int, *, at: datetime) -> bool:
        row = await session.get(PatientKey, patient_id)
        if row is None:
            session.add(
                PatientKey(
                    patient_id=patient_id,
                    master_key_id=None,
                    wrapped=None,
                    created_at=at,
                    rotated_at=None,
                    destroyed_at=at,
                )
            )
            await session.flush()
            return False
        had_key = row.wrapped is not None
        row.wrapped = None
        row.master_key_id = None
        row.destroyed_at = at
        await session.flush()
        return had_key
