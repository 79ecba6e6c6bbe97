"""The notification worker: claim what is due, send it, record the outcome.

One pass (:meth:`NotificationWorker.run_once`):

1. **Claim** (one short transaction): the recipients with e-mail
   notifications due, and for each recipient *all* of its due rows, which
   are marked ``claimed_by`` this worker until ``claimed_until`` (a lease).
   On PostgreSQL several workers claim at once: each locks the recipients'
   ``patients`` rows ``FOR NO KEY UPDATE SKIP LOCKED`` first, so two
   workers never hold the same recipient, and a row already leased is not
   due.  (``NO KEY UPDATE`` does not conflict with the ``KEY SHARE`` lock a
   delivery's foreign key takes: claiming never delays a message.)  On
   SQLite the claim is a job of the single writer (``BEGIN IMMEDIATE``), so
   claims of all processes take turns.
2. **Coalesce** (issue 6.3): one e-mail per recipient for all its claimed
   rows; if an e-mail went to that recipient less than ``coalesce_window``
   ago, its rows are not claimed but moved to the end of the window.
3. **Send** through the injected transport, DKIM-signed, with a VERP
   return path (verp.py), outside any transaction.
4. **Record**: sent rows get ``status=sent``, ``sent_at`` and the e-mail's
   Message-ID, in one transaction at the end of the batch (one commit, one
   fsync, for up to ``batch_size`` e-mails), with a ``notification.sent``
   audit event per recipient (the patient's activity history shows it).  A batch stops when half the
   lease is spent (a slow relay) and gives back the rows it did not try.
   A temporary failure schedules a retry with exponential backoff and
   jitter; a permanent one, or the last allowed attempt, marks
   the rows ``failed`` (``mssante notify list --failed``) with an audit
   event.

**Guarantee.**  A notification is sent at most once per claim; a worker
that dies (or loses the database) between the transport's acceptance and
step 4 leaves its rows claimed until the lease ends, then another pass sends
them again: a crash between sending and recording causes at most one extra
e-mail, never a lost notification.  ``claim_lease`` must exceed the longest
send (smarthost timeouts) so that a slow send is not taken over while it runs;
recording "sent" is accepted whoever holds the claim, so a send that
finished after its lease ended still stops a third one.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from mssante.clock import Clock
from mssante.dkim import DkimSigner
from mssante.metrics import Metrics
from mssante.notify.compose import NotificationEmail, Sender, compose
from mssante.notify.transport import PermanentFailure, TemporaryFailure, Transport, TransportError
from mssante.notify.verp import VerpCodec
from mssante.pseudonym import Pseudonymizer
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
    ProfileStatus,
)
from mssante.store.reading import message_key, view
from mssante.store.writer import Writer

log = logging.getLogger("mssante.notify")

T = TypeVar("T")
N = Notification
ACTOR = "notify"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int
    base: float  # seconds before the first retry
    cap: float  # longest wait

    def delay(self, attempt: int, rng: random.Random) -> timedelta:
        """Wait after failed attempt number ``attempt`` (1 for the first).

        Exponential, capped, with "equal jitter": half of it fixed, half
        random, so notifications that failed together during a relay outage
        do not all come back at the same second.
        """
        exp = min(self.cap, self.base * 2 ** (attempt - 1))
        return timedelta(seconds=exp / 2 + rng.random() * exp / 2)


@dataclass(frozen=True, slots=True)
class Batch:
    """One recipient's notifications, claimed together and sent as one e-mail."""

    recipient_id: int
    ids: tuple[int, ...]


def _unclaimed(now: datetime) -> ColumnElement[bool]:
    return or_(N.claimed_until.is_(None), N.claimed_until <= now)


def _due(now: datetime) -> ColumnElement[bool]:
    return and_(
        N.status == NotificationStatus.PENDING,
        N.channel == Channel.EMAIL,
        N.next_attempt_at <= now,
        _unclaimed(now),
    )


async def claim(
    session: AsyncSession,
    *,
    worker: str,
    now: datetime,
    lease: timedelta,
    window: timedelta,
    limit: int,
) -> list[Batch]:
    """Claim up to ``limit`` recipients' due e-mail notifications (see the module doc)."""
    due = _due(now)
    # PostgreSQL: a recipient another worker is claiming right now is skipped,
    # not waited for, and LIMIT is filled from the others (SKIP LOCKED is
    # applied before LIMIT).  SQLite ignores the clause: the writer lock is
    # enough there.
    people = (
        await session.execute(
            select(Patient.id, Patient.email_invalid)
            .where(Patient.id.in_(select(N.recipient_id).where(due)))
            .order_by(Patient.id)
            .limit(limit)
            .with_for_update(skip_locked=True, key_share=True)
        )
    ).all()
    invalid = [pid for pid, bad in people if bad]
    valid = [pid for pid, bad in people if not bad]
    if invalid:
        # The address bounced since these were planned (bounces.py): the
        # planner would now choose a postal statement, so do the same.
        await session.execute(
            update(N)
            .where(
                N.recipient_id.in_(invalid),
                N.status == NotificationStatus.PENDING,
                N.channel == Channel.EMAIL,
                _unclaimed(now),
            )
            .values(channel=Channel.POSTAL, email=None, next_attempt_at=now)
            .execution_options(synchronize_session=False)
        )
    if not valid:
        return []
    busy = set(
        await session.scalars(
            select(N.recipient_id)
            .where(
                N.recipient_id.in_(valid),
                N.status == NotificationStatus.PENDING,
                N.claimed_until > now,
            )
            .distinct()
        )
    )
    last_sent: dict[int, datetime | None] = {
        pid: at
        for pid, at in (
            await session.execute(
                select(N.recipient_id, func.max(N.sent_at))
                .where(
                    N.recipient_id.in_(valid),
                    N.channel == Channel.EMAIL,
                    N.status == NotificationStatus.SENT,
                )
                .group_by(N.recipient_id)
            )
        )
    }
    ready = []
    for pid in valid:
        if pid in busy:  # another worker is sending this recipient's e-mail
            continue
        last = last_sent.get(pid)
        if last is not None and now < last + window:
            # At most one e-mail per window: wait for its end, then one
            # e-mail counts everything that arrived meanwhile.
            await session.execute(
                update(N)
                .where(N.recipient_id == pid, due)
                .values(next_attempt_at=last + window)
                .execution_options(synchronize_session=False)
            )
            continue
        ready.append(pid)
    if not ready:
        return []
    rows = await session.execute(
        select(N.id, N.recipient_id).where(N.recipient_id.in_(ready), due).order_by(N.id)
    )
    groups: dict[int, list[int]] = {}
    for nid, pid in rows:
        groups.setdefault(pid, []).append(nid)
    ids = [nid for nids in groups.values() for nid in nids]
    if not ids:
        return []
    await session.execute(
        update(N)
        .where(N.id.in_(ids))
        .values(claimed_by=worker, claimed_until=now + lease)
        .execution_options(synchronize_session=False)
    )
    return [Batch(pid, tuple(nids)) for pid, nids in groups.items()]


async def mark_sent(session: AsyncSession, batch: Batch, *, message_id: str, at: datetime) -> int:
    """Record the e-mail; rows another worker recorded already stay as they are."""
    result = await session.execute(
        update(N)
        .where(N.id.in_(batch.ids), N.status == NotificationStatus.PENDING)
        .values(
            status=NotificationStatus.SENT,
            sent_at=at,
            email_message_id=message_id,
            attempts=N.attempts + 1,
            next_attempt_at=None,
            last_error=None,
            claimed_by=None,
            claimed_until=None,
        )
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


async def release(session: AsyncSession, ids: list[int], *, worker: str) -> None:
    """Give back claimed rows that were not tried (due again at once)."""
    await session.execute(
        update(N)
        .where(N.id.in_(ids), N.claimed_by == worker, N.status == NotificationStatus.PENDING)
        .values(claimed_by=None, claimed_until=None)
        .execution_options(synchronize_session=False)
    )


async def mark_attempt_failed(
    session: AsyncSession,
    batch: Batch,
    *,
    worker: str,
    error: TransportError,
    at: datetime,
    policy: RetryPolicy,
    rng: random.Random,
) -> list[int]:
    """Schedule a retry, or mark failed; returns the ids now failed."""
    rows = list(
        await session.scalars(
            select(N)
            .where(
                N.id.in_(batch.ids),
                N.status == NotificationStatus.PENDING,
                N.claimed_by == worker,
            )
            .order_by(N.id)
        )
    )
    if not rows:  # our lease ended and another worker took them over
        return []
    permanent = isinstance(error, PermanentFailure)
    attempt = max(r.attempts for r in rows) + 1
    retry_at = at + policy.delay(attempt, rng)
    failed = []
    for row in rows:
        row.attempts += 1
        row.last_error = str(error)[:500]
        row.claimed_by = None
        row.claimed_until = None
        if permanent or row.attempts >= policy.max_attempts:
            row.status = NotificationStatus.FAILED
            row.next_attempt_at = None
            failed.append(row.id)
        else:
            row.next_attempt_at = retry_at
    if failed:
        await audit.append(
            session,
            at=at,
            kind="notification.failed",
            actor=ACTOR,
            patient_id=batch.recipient_id,
            details={
                "notifications": failed,
                "attempts": attempt,
                "permanent": permanent,
                "code": error.code,
            },
        )
    return failed


class NotificationWorker:
    """Sends e-mail notifications; many may run against one PostgreSQL database."""

    def __init__(
        self,
        *,
        reads: SessionMaker,
        writer: Writer,
        sqlite: bool,
        keyring: Keyring,
        transport: Transport,
        verp: VerpCodec,
        signer: DkimSigner,
        sender: Sender,
        clock: Clock,
        rng: random.Random,
        policy: RetryPolicy,
        worker_id: str,
        lease: float,
        window: float,
        batch_size: int,
        poll_interval: float,
        show_sender_name: bool,
        pseudonym: Pseudonymizer,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics or Metrics()
        self._reads = reads
        self._writer = writer
        self._sqlite = sqlite
        self._keyring = keyring
        self.transport = transport
        self._verp = verp
        self._signer = signer
        self._sender = sender
        self._clock = clock
        self._rng = rng
        self.policy = policy
        self.worker_id = worker_id
        self._lease = timedelta(seconds=lease)
        self._window = timedelta(seconds=window)
        self._batch_size = batch_size
        self._poll = poll_interval
        self._show_sender_name = show_sender_name
        self._pseudonym = pseudonym
        self.sent = 0  # e-mails accepted by the transport (benchmark, logs)

    async def _transaction(self, job: Callable[[AsyncSession], Awaitable[T]]) -> T:
        """A short transaction of notification rows only (no audit event).

        SQLite: a job of the single writer.  PostgreSQL: a session of its own,
        so that claims of several workers run side by side (row locks) and do
        not queue behind the writers' advisory lock.
        """
        if self._sqlite:
            return await self._writer.run(job)
        async with self._reads() as session, session.begin():
            return await job(session)

    async def run_once(self) -> int:
        """Claim one batch and send it; returns the number of e-mails attempted."""
        now = self._clock.now()
        batches = await self._transaction(
            lambda s: claim(
                s,
                worker=self.worker_id,
                now=now,
                lease=self._lease,
                window=self._window,
                limit=self._batch_size,
            )
        )
        sent: list[tuple[Batch, str]] = []
        todo = list(batches)
        try:
            while todo:
                if self._clock.now() >= now + self._lease / 2:
                    break  # slow relay: what is left goes back before the lease ends
                message_id = await self._send(todo[0])
                if message_id is not None:
                    sent.append((todo[0], message_id))
                todo.pop(0)
        finally:
            # One commit for the whole batch: a crash before it resends these
            # e-mails once, after the lease (module docstring).
            if sent or todo:
                await self._record(sent, todo)
        return len(batches) - len(todo)

    async def _record(self, sent: list[tuple[Batch, str]], unsent: list[Batch]) -> None:
        at = self._clock.now()

        async def job(session: AsyncSession) -> None:
            for batch, message_id in sent:
                if await mark_sent(session, batch, message_id=message_id, at=at):
                    # The patient's activity history says a notification left (issue 8.7).
                    await audit.append(
                        session,
                        at=at,
                        kind="notification.sent",
                        actor=ACTOR,
                        patient_id=batch.recipient_id,
                        details={"channel": "email", "notifications": list(batch.ids)},
                    )
            if unsent:
                await release(session, [i for b in unsent for i in b.ids], worker=self.worker_id)

        try:
            # With audit events: through the single writer (the chain stays linear).
            await (self._writer.run(job) if sent else self._transaction(job))
        except Exception:
            log.error("sent notifications not recorded: resent after the lease", exc_info=True)

    async def run_until_idle(self) -> int:
        """Passes until nothing is due now (``mssante notify run --once``)."""
        total = 0
        while n := await self.run_once():
            total += n
        return total

    async def run_forever(self) -> None:
        while True:
            try:
                n = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                # The database may be restarting: try again at the next poll.
                log.warning("notification pass failed", exc_info=True)
                n = 0
            if n == 0:
                await self.transport.close()  # no idle connection to the relay
                await asyncio.sleep(self._poll)

    async def _send(self, batch: Batch) -> str | None:
        """Send one recipient's e-mail; its Message-ID once the transport took it."""
        now = self._clock.now()
        async with self._reads() as session:
            recipient = await session.get(Patient, batch.recipient_id)
            rows = list(await session.scalars(select(N).where(N.id.in_(batch.ids)).order_by(N.id)))
            senders = await self._senders(session, rows) if self._show_sender_name else ()
        if recipient is None or not rows:  # erased meanwhile (rows cascade)
            return None
        who = self._pseudonym(recipient.ins)
        # Planned addresses may differ if the address changed between two
        # messages: the latest plan wins.
        address = next((r.email for r in reversed(rows) if r.email), None)
        if address is None:
            await self._failed(batch, PermanentFailure("no e-mail address"), now, who)
            return None
        children = Counter(r.patient_id for r in rows if r.patient_id != r.recipient_id)
        mail = NotificationEmail(
            to=address,
            activated=recipient.status is ProfileStatus.ACTIVATED,
            own=sum(1 for r in rows if r.patient_id == r.recipient_id),
            children=tuple(children[pid] for pid in sorted(children)),
            senders=senders,
        )
        path = self._verp.new()
        body = compose(mail, self._sender, message_id=path.message_id, at=now)
        signed = await self._signer.sign(body) + body
        try:
            await self.transport.send(path.envelope_from, [address], signed)
        except (TemporaryFailure, PermanentFailure) as exc:
            await self._failed(batch, exc, now, who)
            return None
        self.sent += 1
        self._metrics.notification("email", "sent")
        log.info("notification e-mail sent to=%s notifications=%d", who, len(batch.ids))
        return path.message_id

    async def _failed(self, batch: Batch, error: TransportError, at: datetime, who: str) -> None:
        # Through the single writer: a failure appends an audit event.
        failed = await self._writer.run(
            lambda s: mark_attempt_failed(
                s,
                batch,
                worker=self.worker_id,
                error=error,
                at=at,
                policy=self.policy,
                rng=self._rng,
            )
        )
        self._metrics.notification("email", "failed" if failed else "deferred")
        log.warning(
            "notification e-mail not sent to=%s code=%s %s",
            who,
            error.code,
            f"failed={len(failed)}" if failed else "retry later",
        )

    async def _senders(self, session: AsyncSession, rows: list[Notification]) -> tuple[str, ...]:
        """Display names of the senders (notify.show_sender_name), read through the keys."""
        names: list[str] = []
        for row in rows:
            found = (
                await session.execute(
                    select(Message, Delivery.patient_id)
                    .join(Delivery, Delivery.message_id == Message.id)
                    .where(Delivery.id == row.delivery_id)
                )
            ).first()
            if found is None:
                continue
            message, patient_id = found
            try:
                key = await message_key(session, self._keyring, message, patient_id)
            except KeyDestroyedError:
                continue
            name = view(message, key).from_name
            if name and name not in names:
                names.append(name)
        return tuple(names)
