"""Prometheus metrics and probes on the ops port (issue 9.2): mssante/metrics.py, mssante/ops.

A real gateway with its ops endpoint on port 0, real SMTP clients (plain,
STARTTLS with certificates of tests/pki.py, implicit TLS), real workers
against the fakes of tests/test_notify_fakes.py and tests/outbound_fakes.py;
/metrics read over HTTP and parsed with prometheus_client's own parser.
"""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from mssante import demo
from mssante.app import Gateway
from mssante.cli import seed_demo
from mssante.metrics import CONTENT_TYPE
from mssante.ops.server import ops_port
from mssante.routing.ins import with_key
from mssante.settings import OpsSettings, Settings, TrustSettings
from mssante.smtp.listener import SmtpListener
from mssante.store.db import make_engine, make_sessionmaker
from mssante.store.models import OutboundRecipient, OutboundStatus
from tests.conftest import FakeClock, make_settings
from tests.outbound_fakes import CHU, CHU_DN, FakeOperator, TrustWorld, running_operator
from tests.pki import Issued, Pki, whitelist_xml
from tests.rawsmtp import RawSmtp
from tests.test_gateway import DOCTOR, addr, professional_message, send
from tests.test_notify_fakes import FakeSmarthost, running_smarthost
from tests.test_notify_worker import notifier, notify_settings
from tests.test_outbound_worker import enqueue, outbound_settings, worker

UNKNOWN = with_key("1851275123999")
OPERATOR = "CN=smtp.chu-exemple.fr,OU=26750045200011,O=CHU Exemple,ST=Paris (75),C=FR"


def with_ops(settings: Settings) -> Settings:
    return settings.model_copy(update={"ops": OpsSettings(enabled=True, port=0)})


class Scrape:
    """One /metrics answer, parsed: samples by (name, labels)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def __call__(self, name: str, **labels: str) -> float:
        """The sample's value; a KeyError if the process does not export it."""
        return self.samples[(name, frozenset(labels.items()))]

    def by(self, name: str, *keys: str) -> dict[tuple[str, ...], float]:
        """Every non-zero sample of ``name``, by the values of ``keys``."""
        found = {}
        for (sample, labels), value in self.samples.items():
            if sample == name and value:
                found[tuple(dict(labels)[k] for k in keys)] = value
        return found


async def scrape(gw: Gateway) -> Scrape:
    assert gw.ops is not None
    async with httpx.AsyncClient(base_url=gw.ops.url) as client:
        r = await client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
    return Scrape(r.text)


async def idle(listener: SmtpListener) -> None:
    """Every session of ``listener`` ended (connection_lost ran: gauges are down)."""
    await asyncio.wait_for(listener._idle.wait(), 20)


@pytest.fixture
async def gw(data_dir: Path, db_url: str, clock: FakeClock) -> AsyncIterator[Gateway]:
    settings = with_ops(make_settings(data_dir, database_url=db_url, max_message_size=200_000))
    gateway = Gateway(settings, clock=clock)
    await gateway.start()
    await seed_demo(gateway.store)
    try:
        yield gateway
    finally:
        await gateway.stop()


# --- SMTP ---------------------------------------------------------------------------------


async def test_smtp_outcomes_counted_by_listener_stage_and_reason(gw: Gateway) -> None:
    before = await scrape(gw)
    assert before.by("mssante_smtp_refusals_total", "listener", "stage", "reason") == {}
    assert before("mssante_smtp_sessions_total", listener="mx") == 0

    c = await RawSmtp.connect("127.0.0.1", gw.smtp.port)
    assert (await c.cmd("EHLO client.test")).code == 250
    assert (await c.cmd(f"MAIL FROM:<{DOCTOR}> SIZE=999999999")).code == 552
    assert (await c.cmd(f"MAIL FROM:<{DOCTOR}>")).code == 250
    assert (await c.cmd(f"RCPT TO:<{addr(UNKNOWN)}>")).code == 550
    assert (await c.cmd(f"RCPT TO:<{addr(demo.OPPOSED)}>")).code == 550
    assert (await c.cmd(f"RCPT TO:<{addr(demo.ACTIVATED[:13] + '00')}>")).code == 550  # bad key
    assert (await c.cmd(f"RCPT TO:<{addr(demo.ACTIVATED)}>")).code == 250
    assert (await c.cmd("DATA")).code == 354
    await c.send(b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 210 + b".\r\n")  # 210 kB
    assert (await c.reply()).code == 552
    during = await scrape(gw)  # this session is still open
    assert during("mssante_smtp_sessions_active", listener="mx") == 1
    await c.close()

    errors, _ = await send(gw, professional_message([addr(demo.ACTIVATED)]))
    assert errors == {}
    smuggler = await RawSmtp.connect("127.0.0.1", gw.smtp.port)
    await smuggler.cmd("EHLO client.test")
    await smuggler.cmd(f"MAIL FROM:<{DOCTOR}>")
    await smuggler.cmd(f"RCPT TO:<{addr(demo.ACTIVATED)}>")
    await smuggler.cmd("DATA")
    await smuggler.send(b"Subject: x\r\n\r\nbare\nLF\r\n.\r\n")
    assert (await smuggler.reply()).code == 554
    await smuggler.close()
    await idle(gw.smtp)

    m = await scrape(gw)
    assert m.by("mssante_smtp_refusals_total", "listener", "stage", "reason") == {
        ("mx", "mail", "size_declared_too_big"): 1,
        ("mx", "rcpt", "patient_not_found"): 1,
        ("mx", "rcpt", "mailbox_closed"): 1,
        ("mx", "rcpt", "invalid_address"): 1,
        ("mx", "data", "size_exceeded"): 1,
        ("mx", "data", "bare_line_ending"): 1,
    }
    assert m("mssante_smtp_messages_accepted_total", listener="mx") == 1
    assert m("mssante_smtp_messages_accepted_total", listener="submission") == 0
    assert m("mssante_smtp_sessions_total", listener="mx") == 3
    assert m("mssante_smtp_sessions_active", listener="mx") == 0
    # One 250 at the end of data, well under 5 s, in the histogram.
    assert m("mssante_smtp_time_to_250_seconds_count", listener="mx") == 1
    assert m("mssante_smtp_time_to_250_seconds_bucket", listener="mx", le="5.0") == 1
    assert m("mssante_smtp_time_to_250_seconds_bucket", listener="mx", le="0.001") == 0
    assert 0 < m("mssante_smtp_time_to_250_seconds_sum", listener="mx") < 5
    # The writer committed the message (and the refusals' audit events).
    assert m("mssante_db_writer_transaction_seconds_count") >= 2
    assert m("mssante_db_writer_commit_seconds_count") == m(
        "mssante_db_writer_transaction_seconds_count"
    )
    assert m("mssante_db_writer_batch_jobs_sum") >= m("mssante_db_writer_batch_jobs_count")
    assert m.by("mssante_tls_handshake_failures_total", "listener", "reason") == {}
    # Bounded labels: no INS, no address anywhere in the exposition.
    for secret in (demo.ACTIVATED, demo.OPPOSED, UNKNOWN, "@", "chu-exemple"):
        assert secret not in m.text


# --- TLS ----------------------------------------------------------------------------------


@pytest.fixture
async def tls_gw(tmp_path: Path, clock: FakeClock) -> AsyncIterator[tuple[Gateway, Pki, Issued]]:
    pki = Pki(tmp_path / "pki")
    server = pki.issue("server", "CN=mx.test.localhost,O=Operateur Usagers,C=FR", server=True)
    chu = pki.issue("chu", OPERATOR)
    whitelist = tmp_path / "listeblanche.xml"
    whitelist.write_text(whitelist_xml({"chu-exemple.mssante.fr": OPERATOR}))
    settings = make_settings(
        tmp_path / "data",
        tls_cert=server.cert_path,
        tls_key=server.key_path,
        trust=TrustSettings(anchors=pki.anchors(), crls=[pki.crl()], whitelist=whitelist),
    )
    gateway = Gateway(with_ops(settings), clock=clock)
    await gateway.start()
    await seed_demo(gateway.store)
    try:
        yield gateway, pki, chu
    finally:
        await gateway.stop()


def _context(
    pki: Pki, who: Issued | None, max_version: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(pki.anchors()))
    if max_version is not None:
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        ctx.maximum_version = max_version
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    if who is not None:
        ctx.load_cert_chain(who.cert_path, who.key_path)
    return ctx


def _starttls(port: int, ctx: ssl.SSLContext) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("operator.test")
        client.starttls(context=ctx)
        client.ehlo("operator.test")  # TLS 1.3: the server's alert comes on this read


def _implicit(port: int, ctx: ssl.SSLContext) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", port, timeout=10, context=ctx) as client:
        client.ehlo("client.test")


async def _refused(fn: Any, port: int, ctx: ssl.SSLContext) -> None:
    with pytest.raises((ssl.SSLError, smtplib.SMTPServerDisconnected, ConnectionError)):
        await asyncio.to_thread(fn, port, ctx)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
async def test_tls_handshake_failures_by_listener_and_reason(
    tls_gw: tuple[Gateway, Pki, Issued], tmp_path: Path
) -> None:
    gw, pki, chu = tls_gw
    stranger = Pki(tmp_path / "stranger", prefix="OTHER").issue("intruder", OPERATOR)
    expired = pki.issue("old", OPERATOR, expired=True)
    mx, implicit = gw.smtp.port, gw.submission[1].port

    await _refused(_starttls, mx, _context(pki, stranger))
    await _refused(_starttls, mx, _context(pki, expired))
    await _refused(_starttls, mx, _context(pki, chu, max_version=ssl.TLSVersion.TLSv1_1))
    await _refused(_implicit, implicit, _context(pki, stranger))
    # No client certificate: the handshake succeeds, MAIL is refused (DOMAIN.md 6).
    c = await RawSmtp.connect("127.0.0.1", mx)
    await c.cmd("EHLO operator.test")
    await c.starttls(_context(pki, None), server_hostname="mx.test.localhost")
    await c.cmd("EHLO operator.test")
    assert (await c.cmd(f"MAIL FROM:<{DOCTOR}>")).code == 530
    await c.close()
    await asyncio.gather(idle(gw.smtp), idle(gw.submission[1]))

    m = await scrape(gw)
    assert m.by("mssante_tls_handshake_failures_total", "listener", "reason") == {
        ("mx", "unknown_ca"): 1,
        ("mx", "certificate_expired"): 1,
        ("mx", "protocol_version"): 1,
        ("submission", "unknown_ca"): 1,
    }
    assert m.by("mssante_smtp_refusals_total", "listener", "stage", "reason") == {
        ("mx", "mail", "client_cert_required"): 1
    }
    # Sessions count once the handshake is done on the implicit port; the
    # MX's failed STARTTLS sessions were sessions (opened in clear).
    assert m("mssante_smtp_sessions_total", listener="mx") == 4
    assert m("mssante_smtp_sessions_active", listener="mx") == 0
    assert m("mssante_smtp_sessions_total", listener="submission") == 0
    assert "OTHER" not in m.text and "CHU" not in m.text


# --- queues, read when scraped ------------------------------------------------------------


async def test_queue_gauges_are_read_from_the_database_when_scraped(
    gw: Gateway, clock: FakeClock
) -> None:
    for ins in (demo.ACTIVATED, demo.CREATED_EMAIL, demo.CREATED_POSTAL):
        errors, _ = await send(gw, professional_message([addr(ins)]))
        assert errors == {}
    first = await enqueue(gw, ["dr.a@chu-exemple.mssante.fr", "dr.b@chu-exemple.mssante.fr"])
    clock.advance(seconds=90)
    await enqueue(gw, ["dr.c@chu-exemple.mssante.fr"])
    clock.advance(seconds=30)

    async def hold_one(session: AsyncSession) -> None:
        await session.execute(
            update(OutboundRecipient)
            .where(
                OutboundRecipient.outbound_id == first,
                OutboundRecipient.address == "dr.b@chu-exemple.mssante.fr",
            )
            .values(status=OutboundStatus.HELD)
        )

    await gw.store.writer.run(hold_one)

    m = await scrape(gw)
    assert m("mssante_db_up") == 1
    assert m("mssante_notifications_pending", channel="email") == 2
    assert m("mssante_notifications_pending", channel="postal") == 1
    assert m("mssante_outbound_queue_recipients", status="pending") == 2
    assert m("mssante_outbound_queue_recipients", status="held") == 1
    assert m("mssante_outbound_queue_oldest_age_seconds") == 120  # the FakeClock's

    async def all_sent(session: AsyncSession) -> None:
        await session.execute(
            update(OutboundRecipient)
            .where(OutboundRecipient.status == OutboundStatus.PENDING)
            .values(status=OutboundStatus.SENT)
        )

    await gw.store.writer.run(all_sent)
    m = await scrape(gw)
    assert m("mssante_outbound_queue_recipients", status="pending") == 0
    assert m("mssante_outbound_queue_recipients", status="held") == 1
    assert m("mssante_outbound_queue_oldest_age_seconds") == 0


# --- workers ------------------------------------------------------------------------------


@pytest.fixture
async def smarthost(tmp_path: Path) -> AsyncIterator[FakeSmarthost]:
    async with running_smarthost(tmp_path / "smarthost") as fake:
        yield fake


async def test_notifications_sent_deferred_and_failed_by_channel(
    data_dir: Path, db_url: str, clock: FakeClock, smarthost: FakeSmarthost
) -> None:
    gateway = Gateway(with_ops(notify_settings(data_dir, db_url, smarthost)), clock=clock)
    await gateway.start()
    await seed_demo(gateway.store)
    try:
        work = notifier(gateway, clock).worker
        await send(gateway, professional_message([addr(demo.ACTIVATED)]))
        smarthost.temp_failures = 1
        assert await work.run_once() == 1  # deferred
        clock.advance(seconds=45)  # the first retry (60 s, jittered to 3/4)
        assert await work.run_once() == 1  # sent
        await send(gateway, professional_message([addr(demo.CREATED_EMAIL)]))
        smarthost.permanent = True
        assert await work.run_once() == 1  # failed for good
        m = await scrape(gateway)
        assert m.by("mssante_notifications_total", "channel", "outcome") == {
            ("email", "deferred"): 1,
            ("email", "sent"): 1,
            ("email", "failed"): 1,
        }
        assert m("mssante_notifications_pending", channel="email") == 0
    finally:
        await gateway.stop()


@pytest.fixture
async def chu_operator(tmp_path: Path) -> AsyncIterator[tuple[TrustWorld, FakeOperator]]:
    world = TrustWorld(tmp_path / "world")
    async with running_operator(world, "chu", CHU_DN) as fake:
        yield world, fake


async def test_outbound_recipients_sent_and_failed(
    data_dir: Path,
    db_url: str,
    clock: FakeClock,
    chu_operator: tuple[TrustWorld, FakeOperator],
) -> None:
    world, chu = chu_operator
    settings = with_ops(outbound_settings(data_dir, db_url, world, {CHU: chu.hop}))
    gateway = Gateway(settings, clock=clock)
    await gateway.start()
    try:
        w, _ = worker(gateway, clock)
        await enqueue(gateway, [f"dr.durand@{CHU}", f"dr.martin@{CHU}"])
        assert await w.run_once() == 2
        chu.permanent = True
        await enqueue(gateway, [f"dr.petit@{CHU}"])
        clock.advance(seconds=1)
        assert await w.run_once() == 1
        m = await scrape(gateway)
        assert m.by("mssante_outbound_recipients_total", "outcome") == {
            ("sent",): 2,
            ("failed",): 1,
        }
        assert m("mssante_outbound_queue_recipients", status="pending") == 0
    finally:
        await gateway.stop()


# --- probes -------------------------------------------------------------------------------


async def test_probes_on_the_ops_port(gw: Gateway, data_dir: Path) -> None:
    assert gw.ops is not None
    async with httpx.AsyncClient(base_url=gw.ops.url) as client:
        alive = await client.get("/healthz")
        assert (alive.status_code, alive.json()) == (200, {"status": "ok"})
        ready = await client.get("/readyz")
        assert (ready.status_code, ready.json()) == (
            200,
            {"status": "ok", "database": "ok", "blobs": "ok"},
        )
        assert ready.headers["cache-control"] == "no-store"
        assert (await client.get("/")).status_code == 404  # nothing else is served

    m = await scrape(gw)
    assert m("mssante_db_readiness_query_seconds_count") == 1

    blobs = gw.store.blobs.blob_dir
    moved = blobs.with_name("blobs-away")
    blobs.rename(moved)  # a lost mount (permissions would not stop root)
    try:
        async with httpx.AsyncClient(base_url=gw.ops.url) as client:
            r = await client.get("/readyz")
        assert (r.status_code, r.json()) == (
            503,
            {"status": "unavailable", "database": "ok", "blobs": "failed"},
        )
        assert "blobs-away" not in r.text and str(data_dir) not in r.text
    finally:
        moved.rename(blobs)


async def test_readyz_fails_and_metrics_still_answer_when_the_database_is_unreachable(
    gw: Gateway, db_url: str, tmp_path: Path
) -> None:
    store = gw.store
    # The same store, its read engine now pointing where no database answers:
    # a directory that does not exist (SQLite), a closed port (PostgreSQL).
    if db_url.startswith("sqlite"):
        unreachable = f"sqlite+aiosqlite:///{tmp_path / 'gone' / 'mssante.db'}"
    else:
        unreachable = "postgresql+asyncpg://mssante@127.0.0.1:1/mssante"
    saved = store.read_engine, store.reads
    store.read_engine = make_engine(unreachable)
    store.reads = make_sessionmaker(store.read_engine)
    try:
        assert gw.ops is not None
        async with httpx.AsyncClient(base_url=gw.ops.url) as client:
            r = await client.get("/readyz")
            assert (r.status_code, r.json()) == (
                503,
                {"status": "unavailable", "database": "failed", "blobs": "ok"},
            )
            assert (await client.get("/healthz")).status_code == 200  # alive all the same
        m = await scrape(gw)  # the process's own counters are still served
        assert m("mssante_db_up") == 0
        assert "mssante_smtp_sessions_total" in m.text
    finally:
        await store.read_engine.dispose()
        store.read_engine, store.reads = saved
    m = await scrape(gw)
    assert m("mssante_db_up") == 1


def test_ops_port_of_each_worker(data_dir: Path) -> None:
    assert [ops_port(9025, i) for i in range(3)] == [9025, 9026, 9027]
    assert ops_port(0, 2) == 0  # port 0 stays 0: any free port for each
    assert Gateway(make_settings(data_dir)).ops is None  # ops.enabled = false


def test_each_gateway_has_its_own_registry(data_dir: Path, tmp_path: Path) -> None:
    one = Gateway(make_settings(data_dir))
    two = Gateway(make_settings(tmp_path / "other"))
    one.metrics.listener("mx").sessions.inc()
    assert "mssante_smtp_sessions_total" in one.metrics.render().decode()
    assert b'mssante_smtp_sessions_total{listener="mx"} 1.0' in one.metrics.render()
    assert b'mssante_smtp_sessions_total{listener="mx"} 0.0' in two.metrics.render()
    assert one.store.metrics is one.metrics  # the writer records there too
