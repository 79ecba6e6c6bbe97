"""From a received message to a durable, acknowledged one.

1. in a worker thread: fsync the spool (encrypted as it arrived), read its
   metadata back through the decryptor (mime.py, streaming), rename it into
   the blob store and fsync the directories;
2. through the single writer: the message, deliveries, conversations,
   notifications and audit events in one transaction (inbox.py);
3. return the reference the ``250`` reply quotes.

Nothing is acknowledged before step 2 committed.

Delivery status notifications (RFC 3461/3464, outbound/dsn.py): when the
envelope carries a report (refused recipients in bounce mode,
``NOTIFY=SUCCESS``), its bytes are composed with the message's header
section and written as an outbound blob before step 2, and queued *in the
transaction of step 2*, right after the message is stored: the ``250`` is
never sent before the DSN is durably queued, and a message that is not
stored queues no DSN.  When every recipient was refused, nothing is stored
and the DSN alone is queued (one writer transaction).
"""

from __future__ import annotations

import asyncio
import errno
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from mssante.dkim import DkimVerifier
from mssante.outbound.dsn import DeliveryReport, compose
from mssante.outbound.queue import OutboundQueue, PreparedMessage
from mssante.routing.trust import TrustSpace
from mssante.store import audit
from mssante.store.blobs import BlobStore, Spool
from mssante.store.inbox import Arrival, IncomingMessage, Recipient, StoredMessage, store_messages
from mssante.store.keys import Keyring
from mssante.store.mime import MessageSummary, summarize_stream
from mssante.store.models import OutboundKind
from mssante.store.writer import Writer

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
# The header section attached to a DSN is read up to this size (the data
# phase already refused larger ones: smtp.max_header_size).
_MAX_DSN_HEADERS = 1024 * 1024
_FIELD = re.compile(rb"[!-9;-~]+:")


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
    # The DSN to queue with the message (None: nothing to report).
    report: DeliveryReport | None = None


class MailStore:
    def __init__(
        self,
        *,
        blobs: BlobStore,
        writer: Writer,
        trust: Callable[[], TrustSpace],
        keyring: Keyring,
        dkim: DkimVerifier,
        outbound: OutboundQueue,
    ) -> None:
        self._dkim = dkim
        self._outbound = outbound
        # DSNs prepared for messages waiting in the writer, by message ref.
        self._reports: dict[str, tuple[Envelope, PreparedMessage]] = {}
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
        self,
        *,
        at: datetime,
        sender: str,
        peer: str | None,
        cause: str,
        patient_id: int | None,
        correlation: str | None = None,
    ) -> None:
        """Audit a refused sender or recipient (no address: it may hold an INS).

        ``correlation``: the SMTP transaction's id, also in its log line
        (smtp/transaction.py) and, when a message is stored, its ``ref``.
        """
        details: dict[str, object] = {"cause": cause, "peer": peer}
        if correlation is not None:
            details["correlation"] = correlation
        await self._writer.run(
            lambda session: audit.append(
                session,
                at=at,
                kind="message.refused",
                actor=sender.lower(),
                patient_id=patient_id,
                details=details,
            )
        )

    async def deliver(self, env: Envelope, spool: Spool) -> StoredMessage | None:
        """Store the message and queue its DSN; None when only a DSN was
        queued (bounce mode, every recipient refused)."""
        try:
            summary = await asyncio.to_thread(self._summarize, spool)
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                raise StorageFullError(str(exc)) from exc
            raise
        auth_results = await self._authenticate(spool, summary, env)
        report = await self._prepare_report(env, spool)
        if not env.recipients:
            if report is None:
                raise ValueError("nothing to store and nothing to report")
            await self._writer.run(lambda session: self._queue_report(session, env, report))
            spool.discard()
            return None
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
        if report is not None:
            self._reports[env.ref] = (env, report)
        try:
            return await self._writer.run_batched(self._store, Arrival(incoming, env.recipients))
        finally:
            self._reports.pop(env.ref, None)

    async def _store(self, session: AsyncSession, arrivals: list[Arrival]) -> list[StoredMessage]:
        stored = await store_messages(session, arrivals, trust=self._trust(), keyring=self._keyring)
        # Same transaction: a stored message and its DSN commit together.
        for arrival in arrivals:
            pending = self._reports.get(arrival.incoming.ref)
            if pending is not None:
                await self._queue_report(session, *pending)
        return stored

    async def _prepare_report(self, env: Envelope, spool: Spool) -> PreparedMessage | None:
        """The DSN's bytes, written as an outbound blob (outside any transaction)."""
        if env.report is None:
            return None
        report = env.report
        try:
            raw = await asyncio.to_thread(
                lambda: compose(report, headers=env.trace_header + _header_section(spool))
            )
            return await self._outbound.prepare(raw)
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                raise StorageFullError(str(exc)) from exc
            raise

    async def _queue_report(
        self, session: AsyncSession, env: Envelope, prepared: PreparedMessage
    ) -> None:
        assert env.report is not None
        # RFC 3461 6.2, RFC 5321 4.5.5: a DSN leaves from the null reverse-path.
        await self._outbound.add(
            session,
            prepared,
            kind=OutboundKind.DSN,
            mail_from="",
            recipients=[env.report.to],
            at=env.received_at,
            message_id=env.report.message_id,
        )


def _header_section(spool: Spool) -> bytes:
    """The received header fields, never the body.

    Read up to the empty line; a line that is neither a field (RFC 5322
    2.2: name ":") nor a folded continuation ends the section too, so a
    message without headers gives nothing of its text away.
    """
    with spool.open_plain() as plain:
        head = b""
        while len(head) < _MAX_DSN_HEADERS and b"\r\n\r\n" not in head:
            chunk = plain.read(65536)
            if not chunk:
                break
            head += chunk
    kept: list[bytes] = []
    for line in head[:_MAX_DSN_HEADERS].split(b"\r\n")[:-1]:  # complete lines only
        if _FIELD.match(line) is None and not (kept and line[:1] in (b" ", b"\t")):
            break
        kept.append(line + b"\r\n")
    return b"".join(kept)
