"""Reading stored messages back: the original bytes, exactly as received."""

from __future__ import annotations

import asyncio

from sqlalchemy import select

from mssante.store.blobs import BlobStore
from mssante.store.db import SessionMaker
from mssante.store.models import Message


class MessageNotFoundError(LookupError):
    pass


async def read_original(sessions: SessionMaker, blobs: BlobStore, ref: str) -> bytes:
    """The message ``ref`` as received (without our trace header)."""
    async with sessions() as session:
        key = await session.scalar(select(Message.blob_key).where(Message.ref == ref))
    if key is None:
        raise MessageNotFoundError(ref)
    return await asyncio.to_thread(blobs.read, key)
