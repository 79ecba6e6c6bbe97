"""Reading stored messages back, through a recipient's keys.

A message is readable through any of its deliveries whose patient still has
a data key: data key -> message key -> sealed metadata and body.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from mssante.store.blobs import BlobStore
from mssante.store.conversations import open_conversation
from mssante.store.crypto import unseal
from mssante.store.db import SessionMaker
from mssante.store.keys import (
    KeyDestroyedError,
    Keyring,
    message_key_context,
    message_meta_context,
    unseal_json,
)
from mssante.store.models import Conversation, Delivery, Message


class MessageNotFoundError(LookupError):
    pass


@dataclass(frozen=True, slots=True)
class AttachmentView:
    name: str | None
    type: str
    size: int


@dataclass(frozen=True, slots=True)
class MessageView:
    ref: str
    received_at: datetime
    size: int
    from_address: str | None
    from_name: str | None
    subject: str | None
    to: str | None
    cc: str | None
    date: str | None
    mss_headers: dict[str, str]
    attachments: list[AttachmentView]
    defects: list[str]
    sha256: str
    broken_mime: bool


async def message_key(
    session: AsyncSession, keyring: Keyring, message: Message, patient_id: int | None = None
) -> bytes:
    """The message key, through ``patient_id``'s delivery or any readable one."""
    query = select(Delivery).where(Delivery.message_id == message.id).order_by(Delivery.id)
    if patient_id is not None:
        query = query.where(Delivery.patient_id == patient_id)
    for delivery in await session.scalars(query):
        try:
            dek = await keyring.data_key(session, delivery.patient_id)
        except KeyDestroyedError:
            continue
        return unseal(
            dek, delivery.wrapped_key, message_key_context(message.ref, delivery.patient_id)
        )
    raise KeyDestroyedError(f"message {message.ref}: no recipient key left")


def view(message: Message, key: bytes) -> MessageView:
    meta: dict[str, Any] = unseal_json(key, message.sealed, message_meta_context(message.ref))
    return MessageView(
        ref=message.ref,
        received_at=message.received_at,
        size=message.size,
        from_address=message.from_address,
        from_name=meta["from_name"],
        subject=meta["subject"],
        to=meta["to"],
        cc=meta["cc"],
        date=meta["date"],
        mss_headers=meta["mss_headers"],
        attachments=[AttachmentView(a["name"], a["type"], a["size"]) for a in meta["attachments"]],
        defects=meta["defects"],
        sha256=meta["sha256"],
        broken_mime=message.broken_mime,
    )


async def find_message(session: AsyncSession, ref: str) -> Message:
    message = await session.scalar(select(Message).where(Message.ref == ref))
    if message is None:
        raise MessageNotFoundError(ref)
    return message


async def read_view(
    sessions: SessionMaker, keyring: Keyring, ref: str, patient_id: int | None = None
) -> MessageView:
    async with sessions() as session:
        message = await find_message(session, ref)
        return view(message, await message_key(session, keyring, message, patient_id))


async def read_original(
    sessions: SessionMaker, blobs: BlobStore, keyring: Keyring, ref: str
) -> bytes:
    """The message ``ref`` as received (without our trace header)."""
    async with sessions() as session:
        message = await find_message(session, ref)
        key = await message_key(session, keyring, message)
    blob_key = message.blob_key
    return await asyncio.to_thread(lambda: blobs.read(blob_key, key))


async def conversation_names(
    session: AsyncSession, keyring: Keyring, conv: Conversation
) -> dict[str, str | None]:
    """The professional's display name and first subject of a conversation."""
    return open_conversation(await keyring.data_key(session, conv.patient_id), conv)
