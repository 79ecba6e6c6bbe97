"""The outbound worker: claim due recipients, deliver per message and domain, record.

One pass (:meth:`OutboundWorker.run_once`), the same shape as the
notification worker (notify/worker.py):

1. **Claim** (one short transaction): up to ``batch_size`` due recipients
   (``pending``, ``next_attempt_at`` passed, lease free), marked
   ``claimed_by`` this worker until ``claimed_until``.  On PostgreSQL each
   worker claims in its own transaction and locks the rows
   ``FOR NO KEY UPDATE SKIP LOCKED``: a row another worker is claiming is
   skipped, never waited for, and once claimed it is leased, hence not due;
   so two workers never hold the same recipient.  On SQLite the claim is a
   job of the single writer (``BEGIN IMMEDIATE``).  Claimed rows are grouped
   by (message, domain): one SMTP transaction each.
2. **Deliver** (delivery.py), outside any transaction, up to
   ``concurrency`` groups at once.  Recipients past ``expires_at`` (created
   + ``outbound.max_age``, 5 days by default) are failed without an attempt.
   A pass stops starting deliveries when half the lease is spent and gives
   back what it did not try.
3. **Record**, through the single writer, in one transaction for the pass:
   ``sent``; a temporary failure schedules a retry (exponential backoff with
   jitter, never later than the expiry); a permanent failure, the expiry or
   the last of ``max_attempts`` marks ``failed`` and calls the injected
   ``on_failure`` callbacks in the same transaction (the "Message non
   distribué" notice of replies.py).  Audit events ``outbound.sent`` and
   ``outbound.failed`` name the message, its kind, the domain and recipient
   row ids: no content, no patient address.

**Guarantee**: as for notifications, a recipient is sent at most once per
claim; a worker dying between the operator's ``250`` and the record leaves
its rows leased, and they are sent again once the lease ends (one
duplicate after a crash, never a lost message; RFC 5321 6.1).  "Sent" is
recorded whoever holds the lease, and even if an operator held the row
meanwhile, since the mail did leave.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import and_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from mssante import dkim
from mssante.clock import Clock
from mssante.dkim import DkimSigner
from mssante.metrics import Metrics
from mssante.notify.service import worker_id as new_worker_id
from mssante.notify.worker import RetryPolicy
from mssante.outbound.delivery import (
    ClientTls,
    Envelope,
    OperatorDelivery,
    Outcome,
    RecipientResult,
)
from mssante.outbound.queue import OutboundQueue
from mssante.outbound.routes import DnsMxLookup, MxResolver, NextHopResolver, StaticRoutes
from mssante.settings import Settings
from mssante.store import audit
from mssante.store.db import SessionMaker, is_sqlite
from mssante.store.models import OutboundMessage, OutboundRecipient, OutboundStatus
from mssante.store.writer import Writer

if TYPE_CHECKING:
    from mssante.app import Store, TrustConfig

log = logging.getLogger("mssante.outbound")

T = TypeVar("T")
R = OutboundRecipient
ACTOR = "outbound"
STOP_GRACE = 10.0  # seconds a stopping worker may finish its pass

# on_failure(session, message, recipient, reason, at): called in the writer
# transaction that marks ``recipient`` failed for good.
FailureCallback = Callable[
    [AsyncSession, OutboundMessage, OutboundRecipient, str, datetime], Awaitable[None]
]


@dataclass(frozen=True, slots=True)
class Group:
    """Claimed recipients of one message at one domain: one SMTP transaction."""

    outbound_id: int
    domain: str
    ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Attempt:
    group: Group
    results: dict[int, RecipientResult]  # recipient row id -> outcome
    expired: frozenset[int] = frozenset()  # failed for their age, not attempted


def _due(now: datetime) -> ColumnElement[bool]:
    return and_(
        R.status == OutboundStatus.PENDING,
        R.next_attempt_at <= now,
        or_(R.claimed_until.is_(None), R.claimed_until <= now),
    )


async def claim(
    session: AsyncSession, *, worker: str, now: datetime, lease: timedelta, limit: int
) -> list[Group]:
    """Claim up to ``limit`` due recipients, grouped by (message, domain)."""
    rows = (
        await session.execute(
            select(R.id, R.outbound_id, R.domain)
            .where(_due(now))
            .order_by(R.next_attempt_at, R.outbound_id, R.domain, R.id)
            .limit(limit)
            # PostgreSQL: skip rows another worker is claiming right now
            # (SKIP LOCKED applies before LIMIT); SQLite ignores the clause,
            # the writer lock is enough there.
            .with_for_update(skip_locked=True, key_share=True)
        )
    ).all()
    if not rows:
        return []
    await session.execute(
        update(R)
        .where(R.id.in_([r.id for r in rows]))
        .values(claimed_by=worker, claimed_until=now + lease)
        .execution_options(synchronize_session=False)
    )
    groups: dict[tuple[int, str], list[int]] = {}
    for rid, outbound_id, domain in rows:
        groups.setdefault((outbound_id, domain), []).append(rid)
    return [Group(o, d, tuple(ids)) for (o, d), ids in groups.items()]


async def release(session: AsyncSession, ids: list[int], *, worker: str) -> None:
    """Give back claimed rows that were not tried (due again at once)."""
    await session.execute(
        update(R)
        .where(R.id.in_(ids), R.claimed_by == worker, R.status == OutboundStatus.PENDING)
        .values(claimed_by=None, claimed_until=None)
        .execution_options(synchronize_session=False)
    )


async def record(
    session: AsyncSession,
    attempts: list[Attempt],
    *,
    worker: str,
    at: datetime,
    policy: RetryPolicy,
    rng: random.Random,
    on_failure: Sequence[FailureCallback] = (),
) -> tuple[int, int]:
    """Write the outcome of a pass; returns (recipients sent, recipients failed)."""
    ids = [rid for a in attempts for rid in a.results]
    if not ids:
        return 0, 0
    rows = {r.id: r for r in await session.scalars(select(R).where(R.id.in_(ids)))}
    messages = {
        m.id: m
        for m in await session.scalars(
            select(OutboundMessage).where(
                OutboundMessage.id.in_({a.group.outbound_id for a in attempts})
            )
        )
    }
    total_sent = total_failed = 0
    for attempt in attempts:
        message = messages.get(attempt.group.outbound_id)
        sent: list[int] = []
        failed: list[tuple[OutboundRecipient, str, int | None]] = []
        for rid, result in attempt.results.items():
            row = rows.get(rid)
            if row is None or message is None:  # deleted by an operator meanwhile
                continue
            if result.outcome is Outcome.SENT:
                # The mail left: recorded whoever holds the lease now.
                if row.status in (OutboundStatus.PENDING, OutboundStatus.HELD):
                    row.status = OutboundStatus.SENT
                    row.sent_at = at
                    row.attempts += 1
                    row.next_attempt_at = None
                    row.last_error = None
                    row.claimed_by = row.claimed_until = None
                    sent.append(row.id)
                continue
            if row.status is not OutboundStatus.PENDING or row.claimed_by != worker:
                continue  # held, deleted, or taken over after our lease
            row.claimed_by = row.claimed_until = None
            expired = rid in attempt.expired or at >= row.expires_at
            if rid not in attempt.expired:
                row.attempts += 1
            row.last_error = result.detail
            if (
                result.outcome is Outcome.PERMANENT
                or expired
                or row.attempts >= policy.max_attempts
            ):
                if result.outcome is Outcome.PERMANENT and rid not in attempt.expired:
                    reason = "permanent"
                elif expired:
                    reason = "expired"
                else:
                    reason = "max_attempts"
                row.status = OutboundStatus.FAILED
                row.failed_at = at
                row.next_attempt_at = None
                failed.append((row, reason, result.code))
            else:
                row.next_attempt_at = min(
                    at + policy.delay(max(row.attempts, 1), rng), row.expires_at
                )
        if message is None:
            continue
        base = {
            "outbound": message.id,
            "ref": message.ref,
            "kind": str(message.kind),
            "domain": attempt.group.domain,
        }
        if sent:
            total_sent += len(sent)
            await audit.append(
                session,
                at=at,
                kind="outbound.sent",
                actor=ACTOR,
                patient_id=message.patient_id,
                details={**base, "recipients": sent},
            )
        for reason in sorted({reason for _, reason, _ in failed}):
            these = [(row, code) for row, why, code in failed if why == reason]
            total_failed += len(these)
            await audit.append(
                session,
                at=at,
                kind="outbound.failed",
                actor=ACTOR,
                patient_id=message.patient_id,
                details={
                    **base,
                    "recipients": [row.id for row, _ in these],
                    "reason": reason,
                    "codes": sorted({code for _, code in these if code is not None}),
                },
            )
            for row, _ in these:
                for callback in on_failure:
                    await callback(session, message, row, row.last_error or reason, at)
    return total_sent, total_failed


class OutboundWorker:
    """Delivers the outbound queue; many may run against one PostgreSQL database."""

    def __init__(
        self,
        *,
        reads: SessionMaker,
        writer: Writer,
        sqlite: bool,
        queue: OutboundQueue,
        delivery: OperatorDelivery,
        clock: Clock,
        rng: random.Random,
        policy: RetryPolicy,
        worker_id: str,
        lease: float,
        batch_size: int,
        concurrency: int,
        poll_interval: float,
        on_failure: Sequence[FailureCallback] = (),
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics or Metrics()
        self._reads = reads
        self._writer = writer
        self._sqlite = sqlite
        self._queue = queue
        self.delivery = delivery
        self._clock = clock
        self._rng = rng
        self.policy = policy
        self.worker_id = worker_id
        self._lease = timedelta(seconds=lease)
        self._batch_size = batch_size
        self._concurrency = concurrency
        self._poll = poll_interval
        self.on_failure: list[FailureCallback] = list(on_failure)
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self.sent = 0  # recipients accepted by operators (benchmark, logs)
        self.failed = 0

    def wake(self) -> None:
        """Something was queued: start a pass now instead of at the next poll."""
        self._wake.set()

    async def _transaction(self, job: Callable[[AsyncSession], Awaitable[T]]) -> T:
        """Claims: SQLite through the single writer; PostgreSQL in a session of its
        own, so that several workers claim side by side (row locks)."""
        if self._sqlite:
            return await self._writer.run(job)
        async with self._reads() as session, session.begin():
            return await job(session)

    async def run_once(self) -> int:
        """Claim one batch and deliver it; returns the number of recipients handled."""
        now = self._clock.now()
        groups = await self._transaction(
            lambda s: claim(
                s, worker=self.worker_id, now=now, lease=self._lease, limit=self._batch_size
            )
        )
        if not groups:
            return 0
        # What the deliveries need, read once for the batch (rows held or
        # deleted since the claim are left out).
        async with self._reads() as session:
            messages = {
                m.id: m
                for m in await session.scalars(
                    select(OutboundMessage).where(
                        OutboundMessage.id.in_({g.outbound_id for g in groups})
                    )
                )
            }
            rows = {
                r.id: r
                for r in await session.scalars(
                    select(R).where(
                        R.id.in_([i for g in groups for i in g.ids]),
                        R.status == OutboundStatus.PENDING,
                        R.claimed_by == self.worker_id,
                    )
                )
            }
        # A domain's groups are split into up to ``concurrency`` chunks, each
        # sent over one connection (several transactions, RFC 5321 3.3).
        by_domain: dict[str, list[Group]] = {}
        for group in groups:
            by_domain.setdefault(group.domain, []).append(group)
        chunks: list[list[Group]] = []
        for same in by_domain.values():
            n = min(self._concurrency, len(same))
            chunks += [same[i::n] for i in range(n)]
        semaphore = asyncio.Semaphore(self._concurrency)
        deadline = now + self._lease / 2

        async def one(chunk: list[Group]) -> list[Attempt] | None:
            async with semaphore:
                if self._clock.now() >= deadline:
                    return None  # slow operators: give it back before the lease ends
                try:
                    return await self._attempt(chunk, messages, rows)
                except Exception as exc:
                    # A bug, not the operator: counted as an attempt, so that
                    # it ends (max_attempts, max_age) instead of looping.
                    log.error("outbound delivery crashed, retried later", exc_info=True)
                    text = f"internal error: {type(exc).__name__}"
                    return [
                        Attempt(
                            g,
                            {
                                i: RecipientResult(rows[i].address, Outcome.TEMPORARY, text)
                                for i in g.ids
                                if i in rows
                            },
                        )
                        for g in chunk
                    ]

        done = await asyncio.gather(*(one(c) for c in chunks))
        attempts = [a for d in done if d is not None for a in d]
        untried = [
            i for c, d in zip(chunks, done, strict=True) if d is None for g in c for i in g.ids
        ]
        await self._record(attempts, untried)
        return sum(len(a.results) for a in attempts)

    async def _attempt(
        self,
        chunk: list[Group],
        messages: dict[int, OutboundMessage],
        rows: dict[int, OutboundRecipient],
    ) -> list[Attempt]:
        """Deliver the groups of one domain in ``chunk`` over one connection."""
        now = self._clock.now()
        attempts: list[Attempt] = []
        sending: list[
            tuple[Group, OutboundMessage, list[OutboundRecipient], dict[int, RecipientResult]]
        ] = []
        for group in chunk:
            message = messages.get(group.outbound_id)
            live = [rows[i] for i in group.ids if i in rows]
            if message is None or not live:  # deleted or held meanwhile
                attempts.append(Attempt(group, {}))
                continue
            results: dict[int, RecipientResult] = {}
            for row in list(live):
                if now >= row.expires_at:
                    # RFC 5321 4.5.4.1: give up after the maximum age.
                    last = f" (last: {row.last_error})" if row.last_error else ""
                    text = f"expired: not delivered by {row.expires_at:%Y-%m-%d %H:%M} UTC{last}"
                    results[row.id] = RecipientResult(row.address, Outcome.PERMANENT, text[:300])
                    live.remove(row)
            if live:
                sending.append((group, message, live, results))
            else:
                attempts.append(Attempt(group, results, frozenset(results)))
        if not sending:
            return attempts
        envelopes = [
            Envelope(message.mail_from, [r.address for r in live], self._loader(message))
            for _, message, live, _ in sending
        ]
        outcomes = await self.delivery.deliver_many(chunk[0].domain, envelopes)
        for (group, message, live, results), outcome in zip(sending, outcomes, strict=True):
            expired = frozenset(results)
            for row, result in zip(live, outcome, strict=True):
                results[row.id] = result
            counts = {o: sum(1 for r in outcome if r.outcome is o) for o in Outcome}
            log.info(
                "outbound ref=%s domain=%s sent=%d temporary=%d permanent=%d",
                message.ref,
                group.domain,
                counts[Outcome.SENT],
                counts[Outcome.TEMPORARY],
                counts[Outcome.PERMANENT],
            )
            attempts.append(Attempt(group, results, expired))
        return attempts

    def _loader(self, message: OutboundMessage) -> Callable[[], Awaitable[bytes]]:
        # Read (decrypt) when its turn comes: a chunk never holds all its messages.
        return lambda: self._queue.read(message)

    async def _record(self, attempts: list[Attempt], untried: list[int]) -> None:
        at = self._clock.now()

        def job(callbacks: Sequence[FailureCallback]) -> Callable[[AsyncSession], Awaitable[Any]]:
            async def run(session: AsyncSession) -> tuple[int, int]:
                if untried:
                    await release(session, untried, worker=self.worker_id)
                return await record(
                    session,
                    attempts,
                    worker=self.worker_id,
                    at=at,
                    policy=self.policy,
                    rng=self._rng,
                    on_failure=callbacks,
                )

            return run

        try:
            sent, failed = await self._writer.run(job(self.on_failure))
        except Exception:
            log.error("outbound outcomes not recorded, again without callbacks", exc_info=True)
            # A failing on_failure callback must not leave sent mail
            # unrecorded (it would be sent again after every lease).
            try:
                sent, failed = await self._writer.run(job(()))
            except Exception:
                log.error("outbound outcomes not recorded: retried after the lease", exc_info=True)
                return
        self.sent += sent
        self.failed += failed
        self._metrics.outbound_recipients.labels("sent").inc(sent)
        self._metrics.outbound_recipients.labels("failed").inc(failed)

    async def run_until_idle(self) -> int:
        """Passes until nothing is due now (``mssante queue run --once``)."""
        total = 0
        while n := await self.run_once():
            total += n
        return total

    async def run_forever(self) -> None:
        while not self._stopping:
            try:
                n = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                # The database may be restarting: try again at the next poll.
                log.warning("outbound pass failed", exc_info=True)
                n = 0
            if n == 0 and not self._stopping:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._poll)
                self._wake.clear()

    def start(self) -> None:
        """Run :meth:`run_forever` in a task (``mssante serve``, ``queue run``)."""
        self._stopping = False
        self._task = asyncio.create_task(self.run_forever(), name="outbound-worker")

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Finish the pass under way (so that what it sent is recorded), at most
        ``grace`` seconds, then cancel: what was sent and not recorded goes
        again after the lease (module docstring)."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        self._wake.set()
        await asyncio.wait({task}, timeout=grace)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --- building it from the settings -----------------------------------------------------


def load_signer(settings: Settings, clock: Clock) -> DkimSigner:
    """``outbound.dkim_key_file``, else a development Ed25519 key made once in data_dir/dkim."""
    o = settings.outbound
    return dkim.load_signer(
        o.dkim_key_file,
        data_dir=settings.store.data_dir,
        selector=o.dkim_selector,
        domain=o.dkim_domain or settings.smtp.patient_domain,
        clock=clock,
        setting="outbound.dkim_key_file",
    )


def make_routes(settings: Settings) -> NextHopResolver:
    o = settings.outbound
    if o.routes:
        return StaticRoutes(o.routes)
    return MxResolver(DnsMxLookup(o.timeout))


def client_files(settings: Settings, trust: TrustConfig) -> tuple[Path, Path]:
    """Our client certificate: ``outbound.client_cert``, else the SMTP server certificate.

    An MSSanté operator certificate serves both ways, and peers compare our
    client certificate's subject with the ``DNCertificatOperateur`` listed for
    the patient domain, which is our server certificate's (DOMAIN.md 6).
    The development server certificate carries both usages.
    """
    o = settings.outbound
    if o.client_cert is not None:
        return o.client_cert, o.client_key or o.client_cert
    return trust.cert, trust.key


def build_worker(
    settings: Settings,
    store: Store,
    trust: TrustConfig,
    *,
    clock: Clock,
    routes: NextHopResolver | None = None,
    rng: random.Random | None = None,
    on_failure: Sequence[FailureCallback] = (),
    worker_id: str | None = None,
) -> OutboundWorker:
    o = settings.outbound
    cert, key = client_files(settings, trust)
    assert trust.anchors is not None  # TrustConfig falls back to the development CA
    delivery = OperatorDelivery(
        trust=lambda: trust.space,
        routes=routes or make_routes(settings),
        tls=ClientTls(anchors=trust.anchors, cert=cert, key=key, crls=trust.crls),
        signer=load_signer(settings, clock),
        local_hostname=settings.smtp.hostname,
        timeout=o.timeout,
        verify_operator_dn=o.verify_operator_dn,
    )
    return OutboundWorker(
        reads=store.reads,
        writer=store.writer,
        sqlite=is_sqlite(settings.store.url()),
        queue=store.outbound,
        delivery=delivery,
        clock=clock,
        rng=rng or random.Random(),  # noqa: S311 - jitter, not a secret
        policy=RetryPolicy(o.max_attempts, o.backoff_base, o.backoff_max),
        worker_id=worker_id or new_worker_id(),
        lease=o.claim_lease,
        batch_size=o.batch_size,
        concurrency=o.concurrency,
        poll_interval=o.poll_interval,
        on_failure=on_failure,
        metrics=store.metrics,
    )
