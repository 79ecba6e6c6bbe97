"""Offline consistency checks of a data directory (``mssante store check``).

Run it with the gateway stopped (or accept that a message being stored at
that very moment shows as an orphan blob).  Checks:

- every message row has its blob, and every blob file has its row;
- every message decrypts through one of its recipients' keys: sealed
  metadata, and the whole body, whose size and SHA-256 match what was
  recorded when it was received;
- the audit trail's hash chain is intact.

Messages whose every recipient was erased (data keys destroyed) cannot be
read by design: they are counted, not reported as problems.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from mssante.store.audit import verify_stored_chain
from mssante.store.blobs import BlobStore
from mssante.store.crypto import DecryptionError
from mssante.store.db import SessionMaker
from mssante.store.keys import KeyDestroyedError, Keyring
from mssante.store.models import Message, OutboundMessage
from mssante.store.reading import message_key, view


@dataclass
class Report:
    messages: int = 0
    blobs: int = 0
    erased: int = 0
    audit_events: int = 0
    problems: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _blob_files(blobs: BlobStore) -> dict[str, Path]:
    return {
        p.name: p
        for p in blobs.blob_dir.glob("*/*/*")
        if p.is_file() and p.parent.parent.parent == blobs.blob_dir
    }


def _digest(blobs: BlobStore, blob_key: str, key: bytes) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with blobs.open(blob_key, key) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


async def check_store(
    sessions: SessionMaker,
    blobs: BlobStore,
    keyring: Keyring,
    *,
    progress: Callable[[int], None] | None = None,
) -> Report:
    report = Report()
    on_disk = await asyncio.to_thread(_blob_files, blobs)
    report.blobs = len(on_disk)
    seen: set[str] = set()
    async with sessions() as session:
        messages = await session.stream_scalars(select(Message).order_by(Message.id))
        async for message in messages:
            report.messages += 1
            seen.add(message.blob_key)
            where = f"message {message.ref} (id {message.id})"
            if message.blob_key not in on_disk:
                report.problems.append(f"{where}: blob {message.blob_key} missing")
                continue
            try:
                key = await message_key(session, keyring, message)
            except KeyDestroyedError:
                report.erased += 1
                continue
            except DecryptionError:
                report.problems.append(f"{where}: message key does not decrypt")
                continue
            try:
                meta = view(message, key)
                size, digest = await asyncio.to_thread(_digest, blobs, message.blob_key, key)
            except DecryptionError as exc:
                report.problems.append(f"{where}: undecryptable ({exc})")
                continue
            if size != message.size or digest != meta.sha256:
                report.problems.append(f"{where}: body does not match its recorded size/digest")
            if progress:
                progress(1)
        # Outbound mail waiting or kept (outbound/queue.py) has blobs too.
        seen.update(await session.scalars(select(OutboundMessage.blob_key)))
        report.audit_events, chain_problems = await verify_stored_chain(session)
        report.problems += [f"audit: {p}" for p in chain_problems]
    # A crash between the blob's fsync and the database commit leaves one:
    # never visible, never acknowledged, safe to remove with the gateway stopped.
    report.orphans = sorted(set(on_disk) - seen)
    for orphan in report.orphans:
        report.problems.append(f"orphan blob {orphan} (no message row)")
    return report
