"""The outbound worker against fake professional operators: retries, expiry, claiming.

Real gateway and database (SQLite and PostgreSQL), real SMTP with mutual
TLS to the fakes of tests/outbound_fakes.py; the clock is a FakeClock and
the jitter's randomness is fixed.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import dkim as dkimpy
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from mssante.app import Gateway, Store
from mssante.outbound.worker import OutboundWorker, build_worker, claim, load_signer
from mssante.settings import OutboundSettings, Settings, TrustSettings
from mssante.store.models import (
    AuditEvent,
    OutboundKind,
    OutboundMessage,
    OutboundRecipient,
    OutboundStatus,
)
from tests.conftest import FakeClock, make_settings
from tests.outbound_fakes import (
    CHU,
    CHU_DN,
    CLINIQUE,
    CLINIQUE_DN,
    MESSAGE,
    PATIENT_DN,
    PATIENT_FROM,
    UNLISTED,
    FakeOperator,
    TrustWorld,
    running_operator,
)

DR = f"dr.durand@{CHU}"


class FixedRandom(random.Random):
    """Jitter with a known draw: delays are exactly 3/4 of the exponential step."""

    def random(self) -> float:
        return 0.5


@dataclass(frozen=True)
class Failure:
    outbound_id: int
    recipient_id: int
    address: str
    reason: str
    at: datetime


class FailureRecorder:
    """An ``on_failure`` callback that remembers its calls (and runs in the transaction)."""

    def __init__(self) -> None:
        self.calls: list[Failure] = []

    async def __call__(
        self,
        session: AsyncSession,
        message: OutboundMessage,
        recipient: OutboundRecipient,
        reason: str,
        at: datetime,
    ) -> None:
        assert recipient.status is OutboundStatus.FAILED  # already marked, same transaction
        self.calls.append(Failure(message.id, recipient.id, recipient.address, reason, at))


def outbound_settings(
    data_dir: Path, db_url: str, world: TrustWorld, routes: dict[str, str], **outbound: Any
) -> Settings:
    fields: dict[str, Any] = {
        "worker_enabled": False,  # the tests run the passes themselves
        "routes": routes,
        "client_cert": world.client_cert,
        "client_key": world.client_key,
        "backoff_base": 60.0,
        "backoff_max": 3600.0,
        "timeout": 10.0,
    }
    fields.update(outbound)
    base = make_settings(
        data_dir,
        database_url=db_url,
        trust=TrustSettings(anchors=world.anchors, crls=[world.crl], whitelist=world.whitelist),
    )
    return base.model_copy(update={"outbound": OutboundSettings(**fields)})


@pytest.fixture
def world(tmp_path: Path) -> TrustWorld:
    return TrustWorld(tmp_path / "world")


@pytest.fixture
async def chu(world: TrustWorld) -> AsyncIterator[FakeOperator]:
    async with running_operator(world, "chu", CHU_DN) as fake:
        yield fake


@pytest.fixture
async def gw(
    data_dir: Path,
    db_url: str,
    clock: FakeClock,
    world: TrustWorld,
    chu: FakeOperator,
    request: Any,
) -> AsyncIterator[Gateway]:
    extra = getattr(request, "param", {})
    # The unlisted domain is routed to the same running operator: only the
    # whitelist keeps mail from it.
    routes = {CHU: chu.hop, UNLISTED: chu.hop}
    gateway = Gateway(outbound_settings(data_dir, db_url, world, routes, **extra), clock=clock)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


def worker(
    gw: Gateway, clock: FakeClock, store: Store | None = None, **kw: Any
) -> tuple[OutboundWorker, FailureRecorder]:
    recorder = FailureRecorder()
    w = build_worker(
        gw.settings,
        store or gw.store,
        gw.trust,
        clock=clock,
        rng=FixedRandom(),
        on_failure=[recorder],
        **kw,
    )
    return w, recorder


async def enqueue(
    gw: Gateway,
    recipients: list[str],
    *,
    kind: OutboundKind = OutboundKind.REPLY,
    mail_from: str = PATIENT_FROM,
) -> int:
    prepared = await gw.store.outbound.prepare(MESSAGE)
    at = gw.clock.now()

    async def job(session: AsyncSession) -> int:
        return await gw.store.outbound.add(
            session, prepared, kind=kind, mail_from=mail_from, recipients=recipients, at=at
        )

    return await gw.store.writer.run(job)


async def recipients(gw: Gateway) -> list[OutboundRecipient]:
    async with gw.store.reads() as s:
        return list(await s.scalars(select(OutboundRecipient).order_by(OutboundRecipient.id)))


async def events(gw: Gateway, kind: str) -> list[AuditEvent]:
    async with gw.store.reads() as s:
        return list(
            await s.scalars(
                select(AuditEvent).where(AuditEvent.kind == kind).order_by(AuditEvent.id)
            )
        )


def no_address_in(event: AuditEvent) -> None:
    text = json.dumps(event.details)
    assert "@" not in text and "Merci" not in text, text


# --- retries, backoff, expiry, failure ---------------------------------------------------


async def test_temporary_failures_retry_with_backoff_then_sent_signed(
    gw: Gateway, clock: FakeClock, chu: FakeOperator
) -> None:
    outbound_id = await enqueue(gw, [DR])
    w, failures = worker(gw, clock)
    chu.temp_failures = 2
    start = clock.now()

    assert await w.run_once() == 1
    (r,) = await recipients(gw)
    assert (r.status, r.attempts, r.claimed_by) == (OutboundStatus.PENDING, 1, None)
    assert r.next_attempt_at == start + timedelta(seconds=45)  # 60 s, jittered to 3/4
    assert r.last_error == "451 4.3.0 Service momentanement indisponible"
    assert await w.run_once() == 0  # not due yet

    clock.advance(seconds=45)
    assert await w.run_once() == 1
    (r,) = await recipients(gw)
    assert r.attempts == 2
    assert r.next_attempt_at == clock.now() + timedelta(seconds=90)  # doubled

    clock.advance(seconds=89)
    assert await w.run_once() == 0
    clock.advance(seconds=1)
    assert await w.run_once() == 1
    (r,) = await recipients(gw)
    assert (r.status, r.attempts, r.sent_at) == (OutboundStatus.SENT, 3, clock.now())
    assert r.last_error is None and r.next_attempt_at is None
    assert failures.calls == []

    (mail,) = chu.received
    assert mail.rcpt_tos == [DR] and mail.client_dn == PATIENT_DN
    # DKIM-signed with the key the settings name (dev key in the data dir).
    signer = load_signer(gw.settings, clock)
    assert signer.key_name == "patient._domainkey.patient.mssante.fr"
    record = signer.dns_record().encode()
    assert dkimpy.verify(mail.data, dnsfunc=lambda name, timeout=5: record)

    (event,) = await events(gw, "outbound.sent")
    assert event.details == {
        "outbound": outbound_id,
        "ref": event.details["ref"],
        "kind": "reply",
        "domain": CHU,
        "recipients": [r.id],
    }
    no_address_in(event)


async def test_permanent_failure_ends_at_once_and_calls_on_failure(
    gw: Gateway, clock: FakeClock, chu: FakeOperator
) -> None:
    outbound_id = await enqueue(gw, [DR])
    w, failures = worker(gw, clock)
    chu.permanent = True
    assert await w.run_once() == 1
    (r,) = await recipients(gw)
    assert (r.status, r.attempts, r.failed_at) == (OutboundStatus.FAILED, 1, clock.now())
    assert r.last_error == "550 5.1.1 Destinataire inconnu"
    assert failures.calls == [
        Failure(outbound_id, r.id, DR, "550 5.1.1 Destinataire inconnu", clock.now())
    ]
    (event,) = await events(gw, "outbound.failed")
    assert event.details["reason"] == "permanent" and event.details["codes"] == [550]
    no_address_in(event)
    clock.advance(days=1)
    assert await w.run_once() == 0  # failed is the end


async def test_per_recipient_outcomes_and_the_whitelist_in_one_message(
    gw: Gateway, clock: FakeClock, chu: FakeOperator
) -> None:
    ok, gone, full, outside = f"ok@{CHU}", f"parti@{CHU}", f"plein@{CHU}", f"x@{UNLISTED}"
    chu.refuse = {gone: "550 5.1.1 Destinataire inconnu", full: "452 4.2.2 Boite pleine"}
    await enqueue(gw, [ok, gone, full, outside])
    w, failures = worker(gw, clock)
    assert await w.run_once() == 4
    by_address = {r.address: r for r in await recipients(gw)}
    assert by_address[ok].status is OutboundStatus.SENT
    assert by_address[gone].status is OutboundStatus.FAILED
    assert by_address[full].status is OutboundStatus.PENDING
    assert by_address[full].last_error == "452 4.2.2 Boite pleine"
    assert by_address[outside].status is OutboundStatus.FAILED
    assert by_address[outside].last_error == f"domain {UNLISTED} not in the whitelist"
    assert {f.address for f in failures.calls} == {gone, outside}
    # One connection, for chu.mssante.fr: the unlisted domain (routed to the
    # same running operator) was never contacted.
    assert chu.connections == 1
    assert [m.rcpt_tos for m in chu.received] == [[ok]]


@pytest.mark.parametrize("gw", [{"concurrency": 1}], indirect=True)
async def test_messages_to_one_domain_share_one_connection(
    gw: Gateway, clock: FakeClock, chu: FakeOperator
) -> None:
    """RFC 5321 3.3: one transaction per message on one connection; a message
    refused (451 at DATA, 550 at its only RCPT) does not disturb the next."""
    a, b, c = (f"{x}@{CHU}" for x in "abc")
    chu.temp_failures = 1  # the first message
    chu.refuse = {b: "550 5.1.1 Destinataire inconnu"}
    for address in (a, b, c):
        await enqueue(gw, [address])
    w, _ = worker(gw, clock)
    assert await w.run_once() == 3
    assert chu.connections == 1
    assert [m.rcpt_tos for m in chu.received] == [[c]]
    assert [r.status for r in await recipients(gw)] == [
        OutboundStatus.PENDING,
        OutboundStatus.FAILED,
        OutboundStatus.SENT,
    ]


@pytest.mark.parametrize("gw", [{"max_attempts": 100, "backoff_max": 86_400.0}], indirect=True)
async def test_expires_after_the_maximum_age(
    gw: Gateway, clock: FakeClock, chu: FakeOperator
) -> None:
    await enqueue(gw, [DR])
    start = clock.now()
    w, failures = worker(gw, clock)
    chu.temp_failures = 10**6
    passes = 0
    while True:
        assert await w.run_once() == 1
        passes += 1
        (r,) = await recipients(gw)
        if r.status is OutboundStatus.FAILED:
            break
        assert r.next_attempt_at is not None
        # Retries are never scheduled past the expiry.
        assert r.next_attempt_at <= r.expires_at == start + timedelta(days=5)
        clock._now = r.next_attempt_at
    assert clock.now() == start + timedelta(days=5)
    assert r.failed_at == clock.now()
    assert r.last_error is not None and r.last_error.startswith("expired: not delivered by")
    assert "(last: 451 4.3.0" in r.last_error
    assert r.attempts == passes - 1  # the last pass only noticed the age
    (call,) = failures.calls
    assert call.reason == r.last_error
    (event,) = await events(gw, "outbound.failed")
    assert event.details["reason"] == "expired"
    assert chu.received == []


async def test_a_message_already_too_old_fails_without_connecting(
    gw: Gateway, clock: FakeClock, chu: FakeOperator
) -> None:
    await enqueue(gw, [DR])
    clock.advance(days=5)
    w, failures = worker(gw, clock)
    assert await w.run_once() == 1
    (r,) = await recipients(gw)
    assert (r.status, r.attempts) == (OutboundStatus.FAILED, 0)
    assert chu.connections == 0
    assert len(failures.calls) == 1


@pytest.mark.parametrize("gw", [{"max_attempts": 3}], indirect=True)
async def test_failed_after_max_attempts(gw: Gateway, clock: FakeClock, chu: FakeOperator) -> None:
    await enqueue(gw, [DR])
    w, failures = worker(gw, clock)
    chu.certificate = "rogue"  # a TLS failure is temporary too
    for _ in range(3):
        assert await w.run_once() == 1
        clock.advance(hours=2)
    (r,) = await recipients(gw)
    assert (r.status, r.attempts) == (OutboundStatus.FAILED, 3)
    assert "certificate verify failed" in (r.last_error or "")
    (event,) = await events(gw, "outbound.failed")
    assert event.details["reason"] == "max_attempts"
    assert len(failures.calls) == 1 and chu.received == []


async def test_a_dsn_goes_with_the_null_sender(
    gw: Gateway, clock: FakeClock, chu: FakeOperator
) -> None:
    await enqueue(gw, [DR], kind=OutboundKind.DSN, mail_from="")
    w, _ = worker(gw, clock)
    assert await w.run_once() == 1
    assert chu.received[0].mail_from == "<>"
    (event,) = await events(gw, "outbound.sent")
    assert event.details["kind"] == "dsn"


async def test_a_failing_on_failure_callback_never_loses_what_was_sent(
    gw: Gateway, clock: FakeClock, chu: FakeOperator
) -> None:
    """Were the record lost, sent mail would go again after every lease."""
    ok, gone = f"ok@{CHU}", f"parti@{CHU}"
    chu.refuse = {gone: "550 5.1.1 Destinataire inconnu"}
    await enqueue(gw, [ok, gone])
    w, _ = worker(gw, clock)

    async def broken(*args: Any) -> None:
        raise RuntimeError("bug in a callback")

    w.on_failure = [broken]
    assert await w.run_once() == 2
    assert [r.status for r in await recipients(gw)] == [
        OutboundStatus.SENT,
        OutboundStatus.FAILED,
    ]
    clock.advance(seconds=gw.settings.outbound.claim_lease + 1)
    assert await w.run_once() == 0
    assert len(chu.received) == 1


@pytest.mark.parametrize("gw", [{"concurrency": 1}], indirect=True)
async def test_an_unreadable_message_fails_alone(
    gw: Gateway, clock: FakeClock, chu: FakeOperator
) -> None:
    first = await enqueue(gw, [f"a@{CHU}"])
    await enqueue(gw, [f"b@{CHU}"])
    async with gw.store.reads() as s:
        message = await s.get(OutboundMessage, first)
        assert message is not None
    gw.store.blobs.path_of(message.blob_key).unlink()
    w, _ = worker(gw, clock)
    assert await w.run_once() == 2
    a, b = await recipients(gw)
    assert (a.status, a.attempts) == (OutboundStatus.PENDING, 1)
    assert (a.last_error or "").startswith("message unreadable:")
    assert b.status is OutboundStatus.SENT
    assert [m.rcpt_tos for m in chu.received] == [[f"b@{CHU}"]]


async def test_eight_bit_content_is_announced(
    gw: Gateway, clock: FakeClock, chu: FakeOperator
) -> None:
    prepared = await gw.store.outbound.prepare(
        MESSAGE.replace(b"Merci", "Merci, à bientôt".encode())
    )
    at = clock.now()
    await gw.store.writer.run(
        lambda s: gw.store.outbound.add(
            s, prepared, kind=OutboundKind.REPLY, mail_from=PATIENT_FROM, recipients=[DR], at=at
        )
    )
    await enqueue(gw, [DR])  # ASCII
    w, _ = worker(gw, clock)
    assert await w.run_once() == 2
    announced = {m.data.isascii(): "BODY=8BITMIME" in m.mail_options for m in chu.received}
    assert announced == {False: True, True: False}  # RFC 6152: only for 8-bit content


# --- claiming -----------------------------------------------------------------------------


@pytest.mark.parametrize("gw", [{"batch_size": 2, "concurrency": 2}], indirect=True)
async def test_two_concurrent_workers_send_each_recipient_exactly_once(
    gw: Gateway, clock: FakeClock, chu: FakeOperator
) -> None:
    """Two workers, each with its own engines (as two processes would have),
    claim while the operator holds their deliveries: every recipient goes once."""
    addresses = [f"dr{i}@{CHU}" for i in range(8)]
    for address in addresses:
        await enqueue(gw, [address])
    other = Store(gw.settings)
    await other.open()
    try:
        a, _ = worker(gw, clock)
        b, _ = worker(gw, clock, other)
        chu.hold()
        runs = [asyncio.create_task(x.run_until_idle()) for x in (a, b)]
        await chu.wait_waiting(4)  # both workers are delivering at the same time
        chu.release()
        handled = await asyncio.gather(*runs)
    finally:
        await other.close()
    assert sum(handled) == 8 and all(handled), handled
    assert sorted(rcpt for m in chu.received for rcpt in m.rcpt_tos) == sorted(addresses)
    assert [r.status for r in await recipients(gw)] == [OutboundStatus.SENT] * 8
    assert a.sent + b.sent == 8


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_a_claim_skips_rows_another_worker_is_claiming(gw: Gateway, clock: FakeClock) -> None:
    """PostgreSQL: while worker a's claim transaction is open, worker b neither
    waits for it nor takes its rows (FOR NO KEY UPDATE SKIP LOCKED)."""
    for i in range(4):
        await enqueue(gw, [f"dr{i}@{CHU}"])
    lease = timedelta(minutes=15)
    now = clock.now()
    async with gw.store.reads() as s1, s1.begin():
        first = await claim(s1, worker="a", now=now, lease=lease, limit=2)
        async with gw.store.writer_sessions() as s2, s2.begin():
            second = await asyncio.wait_for(
                claim(s2, worker="b", now=now, lease=lease, limit=10), 10
            )
    a_ids = {i for g in first for i in g.ids}
    b_ids = {i for g in second for i in g.ids}
    assert len(a_ids) == len(b_ids) == 2 and not a_ids & b_ids
    assert {r.claimed_by for r in await recipients(gw)} == {"a", "b"}


async def test_a_crashed_workers_claim_comes_back_after_the_lease_once(
    gw: Gateway, clock: FakeClock, chu: FakeOperator
) -> None:
    await enqueue(gw, [DR])
    lease = timedelta(seconds=gw.settings.outbound.claim_lease)

    async def crashed(session: AsyncSession) -> Any:
        return await claim(session, worker="crashed", now=clock.now(), lease=lease, limit=10)

    (group,) = await gw.store.writer.run(crashed)
    w, _ = worker(gw, clock)
    assert await w.run_once() == 0  # leased to the crashed worker
    clock.advance(seconds=lease.total_seconds() - 1)
    assert await w.run_once() == 0
    clock.advance(seconds=1)
    assert await w.run_once() == 1
    assert await w.run_once() == 0
    assert len(chu.received) == 1
    (r,) = await recipients(gw)
    assert r.id in group.ids and r.status is OutboundStatus.SENT


async def test_one_message_to_two_domains_is_two_transactions(
    world: TrustWorld, gw: Gateway, clock: FakeClock, chu: FakeOperator
) -> None:
    async with running_operator(world, "clinique", CLINIQUE_DN) as clinique:
        routes = {CHU: chu.hop, CLINIQUE: clinique.hop}
        settings = gw.settings.model_copy(
            update={"outbound": gw.settings.outbound.model_copy(update={"routes": routes})}
        )
        await enqueue(gw, [f"a@{CHU}", f"b@{CLINIQUE}", f"c@{CHU}"])
        w = build_worker(settings, gw.store, gw.trust, clock=clock, rng=FixedRandom())
        assert await w.run_once() == 3
        assert [m.rcpt_tos for m in chu.received] == [[f"a@{CHU}", f"c@{CHU}"]]
        assert [m.rcpt_tos for m in clinique.received] == [[f"b@{CLINIQUE}"]]
    assert {r.status for r in await recipients(gw)} == {OutboundStatus.SENT}


# --- the gateway runs it -------------------------------------------------------------------


@pytest.mark.parametrize("gw", [{"worker_enabled": True, "poll_interval": 3600.0}], indirect=True)
async def test_the_gateway_delivers_the_queue(
    gw: Gateway, clock: FakeClock, chu: FakeOperator
) -> None:
    await enqueue(gw, [DR])
    gw.outbound.wake()  # long poll interval: only the wake-up starts a pass
    await chu.wait_received(1)
    assert chu.received[0].rcpt_tos == [DR]
