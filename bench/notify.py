"""Benchmark of the notification worker: e-mails per second to a local smarthost.

Run with ``.venv/bin/python bench/notify.py [--notifications N] [--workers W]
[--seconds S] [--rsa] [--database-url URL]``.

Everything runs in this process on 127.0.0.1: a real gateway (worker off)
receives ``N`` professional messages' worth of deliveries (100 recipients
per message, each an activated patient with an e-mail address), which
writes ``N`` pending e-mail notifications; then ``W`` notification workers
(each with its own database engines, as separate processes would have)
claim, compose, DKIM-sign (Ed25519 by default, ``--rsa`` for RSA 2048) and
send them over STARTTLS to an aiosmtpd sink that answers 250.  The figure
is notifications sent per second of the sending phase, bounded by
``--seconds``.  SQLite in a temporary directory unless ``--database-url``
names an empty PostgreSQL database.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiosmtplib
from aiosmtpd.smtp import SMTP
from sqlalchemy import func, select

from mssante.app import Gateway, Store
from mssante.clock import SystemClock
from mssante.dkim import generate_key
from mssante.notify.service import Notifier
from mssante.routing.ins import with_key
from mssante.settings import (
    NotifySettings,
    OpsSettings,
    Settings,
    SmtpSettings,
    StoreSettings,
    SubmissionSettings,
    TrustSettings,
)
from mssante.smtp.tls import ensure_dev_certificate, server_context
from mssante.store import directory as dirops
from mssante.store.models import Notification, NotificationStatus, ProfileStatus

DOCTOR = "dr.durand@chu-exemple.mssante.fr"
PER_MESSAGE = 100  # limits.recipients_per_message


class Sink:
    """aiosmtpd with STARTTLS required, answering 250 to everything."""

    def __init__(self, tls: Any) -> None:
        self.tls = tls
        self.received = 0
        self._server: asyncio.Server | None = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received += 1
        return "250 2.0.0 Ok: queued"

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SMTP(self, tls_context=self.tls, require_starttls=True, loop=loop),
            "127.0.0.1",
            0,
        )
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def ins(i: int) -> str:
    return with_key(f"1850175{100 + i // 1000:03d}{i % 1000:03d}")


async def seed(gw: Gateway, count: int) -> None:
    at = SystemClock().now()
    records = [
        dirops.PatientRecord(
            ins=ins(i), status=ProfileStatus.ACTIVATED, activation_email=f"p{i}@example.org"
        )
        for i in range(count)
    ]

    async def job(session: Any) -> None:
        for record in records:
            await dirops.upsert_patient(session, record, at=at, actor="bench")

    await gw.store.writer.run(job)
    domain = gw.settings.smtp.patient_domain
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.smtp.port, start_tls=False) as c:
        for start in range(0, count, PER_MESSAGE):
            msg = EmailMessage()
            msg["From"] = f"Dr Alice Durand <{DOCTOR}>"
            msg["To"] = "patients"
            msg["Subject"] = "Compte rendu"
            msg.set_content("Bonjour,\n")
            rcpts = [f"{ins(i)}@{domain}" for i in range(start, min(count, start + PER_MESSAGE))]
            await c.send_message(msg, sender=DOCTOR, recipients=rcpts)


async def pending(store: Store) -> int:
    async with store.reads() as s:
        n = await s.scalar(
            select(func.count())
            .select_from(Notification)
            .where(Notification.status == NotificationStatus.PENDING)
        )
    return int(n or 0)


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="mssante-bench-notify-") as tmp:
        data = Path(tmp) / "data"
        ca, cert, key = ensure_dev_certificate(Path(tmp) / "sink-tls", "localhost")
        sink = Sink(server_context(cert, key))
        port = await sink.start()
        dkim_key = None
        if args.rsa:
            dkim_key = Path(tmp) / "dkim-rsa.key"
            dkim_key.write_bytes(generate_key("rsa-sha256"))
        settings = Settings(
            smtp=SmtpSettings(port=0, hostname="mx.bench.localhost", require_tls=False),
            store=StoreSettings(data_dir=data, database_url=args.database_url),
            trust=TrustSettings(require_client_certificate=False),
            submission=SubmissionSettings(enabled=False),
            ops=OpsSettings(port=0),  # no fixed port
            notify=NotifySettings(
                worker_enabled=False,
                transport="smarthost",
                smarthost_port=port,
                smarthost_ca=ca,
                coalesce_window=0,
                batch_size=args.batch,
                dkim_key_file=dkim_key,
            ),
        )
        gw = Gateway(settings)
        await gw.start()
        stores: list[Store] = []
        try:
            t0 = time.perf_counter()
            await seed(gw, args.notifications)
            print(
                f"seeded {await pending(gw.store)} pending notifications"
                f" in {time.perf_counter() - t0:.1f} s"
            )
            notifiers = []
            for _ in range(args.workers):
                store = Store(settings)
                await store.open()
                stores.append(store)
                notifiers.append(Notifier(settings, store, clock=gw.clock, pseudonym=gw.pseudonym))
            deadline = time.perf_counter() + args.seconds

            async def work(notifier: Notifier) -> None:
                while time.perf_counter() < deadline and await notifier.worker.run_once():
                    pass

            start = time.perf_counter()
            await asyncio.gather(*(work(n) for n in notifiers))
            elapsed = time.perf_counter() - start
            sent = sum(n.worker.sent for n in notifiers)
            for n in notifiers:
                await n.stop()
            left = await pending(gw.store)
            algorithm = notifiers[0].signer.algorithm
            db = "postgresql" if args.database_url else "sqlite"
            print(
                f"{sent} notifications sent in {elapsed:.2f} s = {sent / elapsed:.0f}/s"
                f" ({args.workers} worker(s), batch {args.batch}, DKIM {algorithm},"
                f" STARTTLS, {db}); sink received {sink.received}, {left} left pending"
            )
        finally:
            for store in stores:
                with contextlib.suppress(Exception):
                    await store.close()
            await gw.stop()
            await sink.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--notifications", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rsa", action="store_true", help="RSA 2048 DKIM key (else Ed25519)")
    parser.add_argument("--database-url", default=None)
    asyncio.run(main(parser.parse_args()))
