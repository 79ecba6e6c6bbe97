"""From a received message to a durable, acknowledged one.

1. in a worker thread: fsync the spool (encrypted as it arrived), read its
   metadata back through the decryptor (mime.py, streaming), rename it into
   the blob store and fsync the directories;
2. through the single writer: the message, deliveries, conversations,
   notifications and audit events in one transaction (inbox.py);
3. return the reference the ``250`` reply quotes.

Nothing is acknowledged before step 2 committed.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from mssante.dkim import DkimVerifier
from mssante.routing.trust import TrustSpace
from mssante.store import audit
from mssante.store.blobs import BlobStore, Spool
from mssante.store.inbox import Arrival, IncomingMessage, Recipient, StoredMessage, store_messages
from mssante.store.keys import Keyring
from mssante.store.mime import MessageSummary, summarize_stream
from mssante.store.writer import Writer

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


class StorageFullError(Exception):
    """No space left for a message: answered 452 4.3.1."""


class DkimPolicyError(Exception):
    """The author domain requires a passing signature and there is none."""

    def __init__(self, domain: str, *, temporary: bool) -> None:
        super().__init__(domain)
        self.domain = domain
        self.temporary = temporary


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the store needs to know of an SMTP transaction."""

    ref: str
    received_at: datetime
    mail_from: str
    recipients: list[Recipient]
    helo: str | None
    peer: str | None
    trace_header: bytes


class MailStore:
    def __init__(
        self,
        *,
        blobs: BlobStore,
        writer: Writer,
        trust: Callable[[], TrustSpace],
        keyring: Keyring,
        dkim: DkimVerifier,
    ) -> None:
        self._dkim = dkim
        self.blobs = blobs
        self._writer = writer
        self._trust = trust
        self._keyring = keyring

    @staticmethod
    def _summarize(spool: Spool) -> MessageSummary:
        spool.finish()
        with spool.open_plain() as plain:
            return summarize_stream(plain)

    def _commit(self, spool: Spool) -> str:
        try:
            return self.blobs.commit(spool)
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                raise StorageFullError(str(exc)) from exc
            raise

    async def _authenticate(self, spool: Spool, summary: MessageSummary, env: Envelope) -> bytes:
        """DKIM results as an Authentication-Results header; raises DkimPolicyError."""
        # Opening reads and decrypts the first segment: not on the event loop.
        with await asyncio.to_thread(spool.open_plain) as plain:
            results = await self._dkim.verify(plain)
        author = (summary.from_address or env.mail_from).rpartition("@")[2].lower()
        if not self._dkim.policy_allows(author, results):
            temporary = any(r.result == "temperror" for r in results)
            raise DkimPolicyError(author, temporary=temporary)
        return self._dkim.authentication_results(results)

    async def record_refusal(
        self, *, at: datetime, sender: str, peer: str | None, cause: str, patient_id: int | None
    ) -> None:
        """Audit a refused recipient (no address: it may hold an INS)."""
        await self._writer.run(
            lambda session: audit.append(
                session,
                at=at,
                kind="message.refused",
                actor=sender.lower(),
                patient_id=patient_id,
                details={"cause": cause, "peer": peer},
            )
        )

    async def deliver(self, env: Envelope, spool: Spool) -> StoredMessage:
        try:
            summary = await asyncio.to_thread(self._summarize, spool)
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                raise StorageFullError(str(exc)) from exc
            raise
        auth_results = await self._authenticate(spool, summary, env)
        key = await asyncio.to_thread(self._commit, spool)
        incoming = IncomingMessage(
            ref=env.ref,
            received_at=env.received_at,
            blob_key=key,
            message_key=spool.key,
            size=spool.size,
            sha256=spool.sha256,
            # Stored beside the received bytes, newest first (STYLE.md 6).
            trace_header=auth_results + env.trace_header,
            mail_from=env.mail_from,
            helo=env.helo,
            peer=env.peer,
            summary=summary,
        )
        return await self._writer.run_batched(self._store, Arrival(incoming, env.recipients))

    async def _store(self, session: AsyncSession, arrivals: list[Arrival]) -> list[StoredMessage]:
        return await store_messages(session, arrivals, trust=self._trust(), keyring=self._keyring)
