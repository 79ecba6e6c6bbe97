"""The outbound queue: what must leave, to whom, and how it went.

Putting a message in the queue takes two steps, like receiving one
(mailstore.py): :meth:`OutboundQueue.prepare` writes the bytes as an
encrypted blob (blocking work, in a thread, outside any transaction), then
:meth:`OutboundQueue.add` records the message and its recipients in the
caller's writer transaction, next to whatever else that transaction does
(the patient's reply in the conversation, its audit event...).  Delivery
is the worker's job (delivery.py, worker.py).
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession

from mssante.store.blobs import BlobStore
from mssante.store.crypto import KeyProvider, seal, unseal
from mssante.store.keys import outbound_key_context
from mssante.store.models import (
    OutboundKind,
    OutboundMessage,
    OutboundRecipient,
    OutboundStatus,
)

# RFC 5321 4.5.4.1: give up after 4-5 days.
DEFAULT_MAX_AGE = timedelta(days=5)


@dataclass(frozen=True, slots=True)
class PreparedMessage:
    """Bytes already durable as an encrypted blob, not yet queued."""

    ref: str
    blob_key: str
    size: int
    master_key_id: str
    wrapped_key: bytes


class OutboundQueue:
    def __init__(
        self, blobs: BlobStore, keys: KeyProvider, *, max_age: timedelta = DEFAULT_MAX_AGE
    ) -> None:
        self._blobs = blobs
        self._keys = keys
        self.max_age = max_age

    def _write(self, message: bytes) -> PreparedMessage:
        ref = secrets.token_hex(10)
        spool = self._blobs.new_spool()
        try:
            spool.write(message)
            blob_key = self._blobs.commit(spool)
        except BaseException:
            spool.discard()
            raise
        master = self._keys.current()
        return PreparedMessage(
            ref=ref,
            blob_key=blob_key,
            size=len(message),
            master_key_id=master.id,
            wrapped_key=seal(master.key, spool.key, outbound_key_context(ref)),
        )

    async def prepare(self, message: bytes) -> PreparedMessage:
        """Write ``message`` (exactly the bytes to send, CRLF) as a durable encrypted blob."""
        return await asyncio.to_thread(self._write, message)

    async def add(
        self,
        session: AsyncSession,
        prepared: PreparedMessage,
        *,
        kind: OutboundKind,
        mail_from: str,
        recipients: list[str],
        at: datetime,
        message_id: str | None = None,
        patient_id: int | None = None,
        conversation_id: int | None = None,
        delivery_id: int | None = None,
        envelope_id: str | None = None,
    ) -> int:
        """Queue ``prepared`` for ``recipients`` in the session's transaction; its id."""
        if not recipients:
            raise ValueError("an outbound message needs at least one recipient")
        conn = await session.connection()
        result = await conn.execute(
            insert(OutboundMessage).returning(OutboundMessage.id),
            {
                "ref": prepared.ref,
                "kind": kind,
                "created_at": at,
                "mail_from": mail_from,
                "message_id": message_id,
                "blob_key": prepared.blob_key,
                "size": prepared.size,
                "master_key_id": prepared.master_key_id,
                "wrapped_key": prepared.wrapped_key,
                "patient_id": patient_id,
                "conversation_id": conversation_id,
                "delivery_id": delivery_id,
                "envelope_id": envelope_id,
            },
        )
        outbound_id: int = result.scalar_one()
        await conn.execute(
            insert(OutboundRecipient),
            [
                {
                    "outbound_id": outbound_id,
                    "address": address,
                    "domain": address.rpartition("@")[2].lower(),
                    "status": OutboundStatus.PENDING,
                    "attempts": 0,
                    "next_attempt_at": at,
                    "expires_at": at + self.max_age,
                }
                for address in recipients
            ],
        )
        return outbound_id

    def message_key(self, message: OutboundMessage) -> bytes:
        master = self._keys.get(message.master_key_id)
        return unseal(master.key, message.wrapped_key, outbound_key_context(message.ref))

    async def read(self, message: OutboundMessage) -> bytes:
        """The bytes to send (decrypted)."""
        key = self.message_key(message)
        return await asyncio.to_thread(self._blobs.read, message.blob_key, key)
