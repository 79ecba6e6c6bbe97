"""The notification worker against a fake smarthost: retries, failure, coalescing, claiming.

Real gateway, real database (SQLite and PostgreSQL), real SMTP with
STARTTLS and AUTH to the fake relay of tests/test_notify_fakes.py; the clock
is a FakeClock and the jitter's randomness is fixed.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from mssante import demo
from mssante.app import Gateway, Store
from mssante.cli import seed_demo
from mssante.notify.service import Notifier
from mssante.notify.worker import RetryPolicy, claim
from mssante.routing.ins import with_key
from mssante.settings import NotifySettings, Settings
from mssante.store import directory as dirops
from mssante.store.models import (
    AuditEvent,
    Channel,
    Notification,
    NotificationStatus,
    Patient,
    ProfileStatus,
)
from tests.conftest import FakeClock, make_settings
from tests.test_gateway import addr, patient_id, professional_message, send
from tests.test_notify_fakes import PASSWORD, USER, FakeSmarthost, running_smarthost

WEBMAIL = "https://webmail.test/"


class FixedRandom(random.Random):
    """Jitter with a known draw: delays are exactly 3/4 of the exponential step."""

    def random(self) -> float:
        return 0.5


def notify_settings(
    data_dir: Path, db_url: str, relay: FakeSmarthost | None, **notify: Any
) -> Settings:
    fields: dict[str, Any] = {
        "worker_enabled": False,  # the tests run the passes themselves
        "webmail_url": WEBMAIL,
        "activation_url": WEBMAIL + "activer",
        "backoff_base": 60.0,
        "backoff_max": 3600.0,
    }
    if relay is not None:
        fields.update(
            transport="smarthost",
            smarthost_port=relay.port,
            smarthost_ca=relay.ca,
            smarthost_username=USER,
            smarthost_password=PASSWORD,
            smarthost_timeout=10.0,
        )
    fields.update(notify)
    base = make_settings(data_dir, database_url=db_url)
    return base.model_copy(update={"notify": NotifySettings(**fields)})


def notifier(gw: Gateway, clock: FakeClock, store: Store | None = None) -> Notifier:
    return Notifier(
        gw.settings,
        store or gw.store,
        clock=clock,
        pseudonym=gw.pseudonym,
        rng=FixedRandom(),
    )


@pytest.fixture
async def smarthost(tmp_path: Path) -> AsyncIterator[FakeSmarthost]:
    async with running_smarthost(tmp_path / "smarthost") as fake:
        yield fake


@pytest.fixture
async def gw(
    data_dir: Path, db_url: str, clock: FakeClock, smarthost: FakeSmarthost, request: Any
) -> AsyncIterator[Gateway]:
    extra = getattr(request, "param", {})
    gateway = Gateway(notify_settings(data_dir, db_url, smarthost, **extra), clock=clock)
    await gateway.start()
    await seed_demo(gateway.store)
    try:
        yield gateway
    finally:
        await gateway.stop()


async def notifications(gw: Gateway, **where: Any) -> list[Notification]:
    query = select(Notification).order_by(Notification.id)
    for key, value in where.items():
        query = query.where(getattr(Notification, key) == value)
    async with gw.store.reads() as s:
        return list(await s.scalars(query))


def parsed(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def text_of(data: bytes) -> str:
    body = parsed(data).get_body(("plain",))
    assert body is not None
    return str(body.get_content())


# --- retries, backoff, failure -----------------------------------------------------------


async def test_temporary_failures_are_retried_with_backoff_then_sent(
    gw: Gateway, clock: FakeClock, smarthost: FakeSmarthost
) -> None:
    await send(gw, professional_message([addr(demo.ACTIVATED)]))
    worker = notifier(gw, clock).worker
    smarthost.temp_failures = 2
    start = clock.now()

    assert await worker.run_once() == 1
    (n,) = await notifications(gw)
    assert (n.status, n.attempts) == (NotificationStatus.PENDING, 1)
    # 60 s, jittered to 3/4 by the fixed draw.
    assert n.next_attempt_at == start + timedelta(seconds=45)
    assert "451" in (n.last_error or "")
    assert await worker.run_once() == 0  # not due yet

    clock.advance(seconds=45)
    assert await worker.run_once() == 1
    (n,) = await notifications(gw)
    assert n.attempts == 2
    assert n.next_attempt_at == clock.now() + timedelta(seconds=90)  # doubled

    clock.advance(seconds=89)
    assert await worker.run_once() == 0
    clock.advance(seconds=1)
    assert await worker.run_once() == 1
    (n,) = await notifications(gw)
    assert (n.status, n.attempts, n.sent_at) == (NotificationStatus.SENT, 3, clock.now())
    assert n.claimed_by is None and n.last_error is None
    (mail,) = smarthost.received
    assert mail.rcpt_tos == ["camille.martin@example.org"]
    assert parsed(mail.data)["Message-ID"] == n.email_message_id


def test_backoff_is_capped_and_jittered() -> None:
    policy = RetryPolicy(max_attempts=20, base=60, cap=3600)
    low, high = random.Random(), random.Random()
    low.random = lambda: 0.0  # type: ignore[method-assign]
    high.random = lambda: 0.999999  # type: ignore[method-assign]
    assert policy.delay(1, low) == timedelta(seconds=30)
    assert policy.delay(3, low) == timedelta(seconds=120)
    assert policy.delay(30, low) == timedelta(seconds=1800)  # half of the cap
    assert policy.delay(30, high) < timedelta(seconds=3600)
    assert policy.delay(30, high) > timedelta(seconds=3599)


def mssante_cli(gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.update(
        MSSANTE_STORE__DATA_DIR=str(gw.settings.store.data_dir),
        MSSANTE_STORE__DATABASE_URL=gw.settings.store.url(),
        COLUMNS="250",
    )
    return subprocess.run(
        [sys.executable, "-m", "mssante", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("gw", [{"max_attempts": 3}], indirect=True)
async def test_failed_after_max_attempts_listed_and_retried_by_cli(
    gw: Gateway, clock: FakeClock, smarthost: FakeSmarthost
) -> None:
    await send(gw, professional_message([addr(demo.ACTIVATED)]))
    worker = notifier(gw, clock).worker
    smarthost.temp_failures = 100
    for _ in range(3):
        assert await worker.run_once() == 1
        clock.advance(hours=2)
    (n,) = await notifications(gw)
    assert (n.status, n.attempts, n.next_attempt_at) == (NotificationStatus.FAILED, 3, None)
    assert await worker.run_once() == 0
    async with gw.store.reads() as s:
        (event,) = await s.scalars(
            select(AuditEvent).where(AuditEvent.kind == "notification.failed")
        )
    assert event.details == {
        "notifications": [n.id],
        "attempts": 3,
        "permanent": False,
        "code": 451,
    }

    listed = await asyncio.to_thread(mssante_cli, gw, "notify", "list", "--failed")
    assert listed.returncode == 0, listed.stderr
    assert f"│ {n.id} " in listed.stdout and "failed" in listed.stdout
    retried = await asyncio.to_thread(mssante_cli, gw, "notify", "retry", "--all-failed")
    assert retried.returncode == 0, retried.stderr
    assert "1 notifications queued again" in retried.stdout
    (n,) = await notifications(gw)
    assert (n.status, n.attempts) == (NotificationStatus.PENDING, 0)

    smarthost.temp_failures = 0
    clock.advance(seconds=1)  # the CLI used the real clock
    clock._now = max(clock.now(), n.next_attempt_at or clock.now())
    assert await worker.run_once() == 1
    (n,) = await notifications(gw)
    assert n.status is NotificationStatus.SENT
    assert len(smarthost.received) == 1


async def test_permanent_refusal_fails_at_once(
    gw: Gateway, clock: FakeClock, smarthost: FakeSmarthost
) -> None:
    await send(gw, professional_message([addr(demo.ACTIVATED)]))
    smarthost.permanent = True
    assert await notifier(gw, clock).worker.run_once() == 1
    (n,) = await notifications(gw)
    assert (n.status, n.attempts) == (NotificationStatus.FAILED, 1)
    assert "550" in (n.last_error or "")


async def test_tls_failure_with_the_relay_is_retried(
    gw: Gateway, clock: FakeClock, smarthost: FakeSmarthost
) -> None:
    await send(gw, professional_message([addr(demo.ACTIVATED)]))
    worker = notifier(gw, clock).worker
    smarthost.tls_failure = True
    assert await worker.run_once() == 1
    (n,) = await notifications(gw)
    assert n.status is NotificationStatus.PENDING and "certificate" in (n.last_error or "")
    smarthost.tls_failure = False
    clock.advance(seconds=45)
    assert await worker.run_once() == 1
    assert [r.rcpt_tos for r in smarthost.received] == [["camille.martin@example.org"]]


# --- coalescing ------------------------------------------------------------------------


async def test_pending_rows_of_one_person_make_one_email(
    gw: Gateway, clock: FakeClock, smarthost: FakeSmarthost
) -> None:
    for _ in range(3):
        await send(gw, professional_message([addr(demo.ACTIVATED)]))
    assert await notifier(gw, clock).worker.run_once() == 1
    (mail,) = smarthost.received
    assert "Vous avez 3 nouveaux messages" in text_of(mail.data)
    rows = await notifications(gw)
    assert {r.status for r in rows} == {NotificationStatus.SENT}
    assert {r.email_message_id for r in rows} == {parsed(mail.data)["Message-ID"]}
    # One audit event for the e-mail: the patient's activity history shows it.
    async with gw.store.reads() as s:
        events = list(
            await s.scalars(select(AuditEvent).where(AuditEvent.kind == "notification.sent"))
        )
    assert [(e.patient_id, sorted(e.details["notifications"])) for e in events] == [
        (await patient_id(gw, demo.ACTIVATED), sorted(r.id for r in rows))
    ]


@pytest.mark.parametrize("gw", [{"coalesce_window": 900.0}], indirect=True)
async def test_one_email_per_window_then_a_summary(
    gw: Gateway, clock: FakeClock, smarthost: FakeSmarthost
) -> None:
    worker = notifier(gw, clock).worker
    await send(gw, professional_message([addr(demo.ACTIVATED)]))
    first_at = clock.now()
    assert await worker.run_once() == 1
    assert "Vous avez un nouveau message" in text_of(smarthost.received[0].data)

    clock.advance(minutes=2)
    await send(gw, professional_message([addr(demo.ACTIVATED)]))
    clock.advance(minutes=3)
    await send(gw, professional_message([addr(demo.ACTIVATED)]))
    assert await worker.run_once() == 0  # the window is not over
    waiting = await notifications(gw, status=NotificationStatus.PENDING)
    assert [n.next_attempt_at for n in waiting] == [first_at + timedelta(minutes=15)] * 2

    clock.advance(minutes=9, seconds=59)
    assert await worker.run_once() == 0
    clock.advance(seconds=1)
    assert await worker.run_once() == 1
    assert len(smarthost.received) == 2
    summary = smarthost.received[1]
    assert "Vous avez 2 nouveaux messages" in text_of(summary.data)
    later = await notifications(gw)
    assert [n.status for n in later] == [NotificationStatus.SENT] * 3
    assert (
        later[1].email_message_id == later[2].email_message_id == parsed(summary.data)["Message-ID"]
    )
    assert later[0].email_message_id != later[1].email_message_id


# --- claiming -----------------------------------------------------------------------------


async def add_patients(gw: Gateway, count: int) -> list[str]:
    records = [
        dirops.PatientRecord(
            ins=with_key(f"1850175123{900 + i}"),
            status=ProfileStatus.ACTIVATED,
            activation_email=f"patient{i}@example.org",
        )
        for i in range(count)
    ]

    async def job(session: Any) -> None:
        for r in records:
            await dirops.upsert_patient(session, r, at=gw.clock.now(), actor="test")

    await gw.store.writer.run(job)
    return [r.ins for r in records]


@pytest.mark.parametrize("gw", [{"batch_size": 2}], indirect=True)
async def test_two_concurrent_workers_never_send_the_same_notification(
    gw: Gateway, clock: FakeClock, smarthost: FakeSmarthost
) -> None:
    """Two workers, each with its own engines (as two processes would have), claim
    while the relay holds their first e-mails: every notification goes out once."""
    ins = await add_patients(gw, 8)
    await send(gw, professional_message([addr(i) for i in ins]))
    other = Store(gw.settings)
    await other.open()
    try:
        a, b = notifier(gw, clock).worker, notifier(gw, clock, other).worker
        smarthost.hold()
        runs = [asyncio.create_task(w.run_until_idle()) for w in (a, b)]
        await smarthost.wait_waiting(2)  # both are sending at the same time
        smarthost.release()
        sent = await asyncio.gather(*runs)
    finally:
        await other.close()
    assert sum(sent) == 8 and all(sent), sent
    assert sorted(r.rcpt_tos[0] for r in smarthost.received) == sorted(
        f"patient{i}@example.org" for i in range(8)
    )
    rows = await notifications(gw)
    assert [r.status for r in rows] == [NotificationStatus.SENT] * 8
    ids = {parsed(r.data)["Message-ID"] for r in smarthost.received}
    assert {r.email_message_id for r in rows} == ids and len(ids) == 8


async def test_a_crashed_workers_claim_comes_back_after_the_lease_once(
    gw: Gateway, clock: FakeClock, smarthost: FakeSmarthost
) -> None:
    """HACKING.md: a worker that dies between claiming (or sending) and recording
    leaves its rows leased; after the lease another worker sends them, once."""
    await send(gw, professional_message([addr(demo.ACTIVATED)]))

    async def crashed(session: Any) -> Any:
        return await claim(
            session,
            worker="crashed",
            now=clock.now(),
            lease=timedelta(seconds=300),
            window=timedelta(0),
            limit=10,
        )

    (batch,) = await gw.store.writer.run(crashed)
    worker = notifier(gw, clock).worker
    assert await worker.run_once() == 0  # leased to the crashed worker
    clock.advance(seconds=299)
    assert await worker.run_once() == 0
    clock.advance(seconds=1)
    assert await worker.run_once() == 1
    assert await worker.run_once() == 0
    assert len(smarthost.received) == 1
    (n,) = await notifications(gw)
    assert n.id in batch.ids and n.status is NotificationStatus.SENT


async def test_postal_rows_are_not_the_email_workers(
    gw: Gateway, clock: FakeClock, smarthost: FakeSmarthost
) -> None:
    await send(gw, professional_message([addr(demo.CREATED_POSTAL)]))
    assert await notifier(gw, clock).worker.run_once() == 0
    (n,) = await notifications(gw)
    assert (n.channel, n.status, n.claimed_by) == (Channel.POSTAL, NotificationStatus.PENDING, None)


async def test_pending_email_rows_of_a_bounced_address_go_postal(
    gw: Gateway, clock: FakeClock, smarthost: FakeSmarthost
) -> None:
    await send(gw, professional_message([addr(demo.ACTIVATED)]))
    pid = await patient_id(gw, demo.ACTIVATED)

    async def invalidate(session: Any) -> None:
        patient = await session.get(Patient, pid)
        patient.email_invalid = True

    await gw.store.writer.run(invalidate)
    assert await notifier(gw, clock).worker.run_once() == 0
    (n,) = await notifications(gw)
    assert (n.channel, n.email, n.status) == (Channel.POSTAL, None, NotificationStatus.PENDING)
    assert smarthost.received == []
