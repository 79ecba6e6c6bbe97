"""Benchmark of the outbound queue: messages per second to a local fake operator.

Run with ``.venv/bin/python bench/outbound.py [--messages N] [--workers W]
[--concurrency C] [--batch B] [--seconds S] [--rsa] [--database-url URL]``.

Everything runs in this process on 127.0.0.1: a real gateway (worker off)
queues ``N`` patient replies (about 2 KB each, one recipient each, encrypted
at rest like real ones) through ``store.outbound.prepare`` + ``add``; then
``W`` outbound workers (each with its own database engines, as separate
processes would have) claim them, read and decrypt them, DKIM-sign them
(Ed25519 by default, ``--rsa`` for RSA 2048) and deliver them to an
aiosmtpd operator over STARTTLS with mutual TLS (it requires our client
certificate; we verify its certificate, host name and listed operator DN),
one connection per message, up to ``C`` at once per worker.  The figure is
messages delivered per second of the sending phase, bounded by
``--seconds``.  SQLite in a temporary directory unless ``--database-url``
names an empty PostgreSQL database.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiosmtpd.smtp import SMTP
from cryptography import x509
from sqlalchemy import func, select

from mssante.app import Gateway, Role, Store
from mssante.dkim import generate_key
from mssante.outbound.worker import OutboundWorker, build_worker
from mssante.settings import (
    OpsSettings,
    OutboundSettings,
    Settings,
    SmtpSettings,
    StoreSettings,
    SubmissionSettings,
    TrustSettings,
)
from mssante.smtp.tls import ensure_dev_certificate, server_context
from mssante.store.models import OutboundKind, OutboundRecipient, OutboundStatus

DOMAIN = "chu-exemple.mssante.fr"
HOSTNAME = "mx.bench.localhost"
PATIENT = "146026322000196@patient.mssante.fr"
BODY = (
    (
        f"From: Camille Martin <{PATIENT}>\r\nTo: dr.durand@{DOMAIN}\r\n"
        "Subject: Re: compte rendu\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n"
    )
    + "Bonjour docteur, merci pour votre message.\r\n" * 45
).encode()


class Operator:
    """aiosmtpd requiring STARTTLS and a client certificate, answering 250."""

    def __init__(self, tls: ssl.SSLContext) -> None:
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


def whitelist(domain: str, dn: str) -> str:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<ListeBlanche xmlns="https://listeblanche.mssante.fr/schema">'
        "<DateDeGeneration>2026-11-23T00:00:00+01:00</DateDeGeneration>"
        f"<Domaine><Nom>{domain}</Nom><Description>bench</Description>"
        f"<DNCertificatOperateur>{dn}</DNCertificatOperateur>"
        "<ResponsableContact>r@example.org</ResponsableContact>"
        "<SupportContact>s@example.org</SupportContact><DateMAJ>2026-11-23</DateMAJ>"
        "</Domaine></ListeBlanche>"
    )


async def enqueue(gw: Gateway, count: int) -> None:
    at = gw.clock.now()
    for start in range(0, count, 200):
        prepared = [await gw.store.outbound.prepare(BODY) for _ in range(min(200, count - start))]

        async def job(session: Any, prepared: list[Any] = prepared, start: int = start) -> None:
            for i, p in enumerate(prepared):
                await gw.store.outbound.add(
                    session,
                    p,
                    kind=OutboundKind.REPLY,
                    mail_from=PATIENT,
                    recipients=[f"dr{start + i}@{DOMAIN}"],
                    at=at,
                )

        await gw.store.writer.run(job)


async def count(store: Store, status: OutboundStatus) -> int:
    async with store.reads() as s:
        n = await s.scalar(
            select(func.count())
            .select_from(OutboundRecipient)
            .where(OutboundRecipient.status == status)
        )
    return int(n or 0)


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="mssante-bench-outbound-") as tmp:
        data = Path(tmp) / "data"
        # The development PKI: the operator presents the dev server
        # certificate (SAN 127.0.0.1), and so do we as client (both usages);
        # the whitelist lists the operator's DN for DOMAIN.
        ca, cert, key = ensure_dev_certificate(data / "tls", HOSTNAME)
        dn = x509.load_pem_x509_certificate(cert.read_bytes()).subject.rfc4514_string()
        listed = Path(tmp) / "whitelist.xml"
        listed.write_text(whitelist(DOMAIN, dn), encoding="utf-8")
        tls = server_context(cert, key, anchors=ca)
        tls.verify_mode = ssl.CERT_REQUIRED
        operator = Operator(tls)
        port = await operator.start()
        dkim_key = None
        if args.rsa:
            dkim_key = Path(tmp) / "dkim-rsa.key"
            dkim_key.write_bytes(generate_key("rsa-sha256"))
        settings = Settings(
            smtp=SmtpSettings(port=0, hostname=HOSTNAME, require_tls=False),
            store=StoreSettings(data_dir=data, database_url=args.database_url),
            trust=TrustSettings(anchors=ca, whitelist=listed),
            ops=OpsSettings(port=0),  # no fixed port
            submission=SubmissionSettings(enabled=False),
            outbound=OutboundSettings(
                worker_enabled=False,
                routes={DOMAIN: f"127.0.0.1:{port}"},
                batch_size=args.batch,
                concurrency=args.concurrency,
                dkim_key_file=dkim_key,
            ),
        )
        gw = Gateway(settings, roles={Role.GATEWAY})
        await gw.start()
        stores: list[Store] = []
        try:
            t0 = time.perf_counter()
            await enqueue(gw, args.messages)
            print(
                f"queued {await count(gw.store, OutboundStatus.PENDING)} messages"
                f" in {time.perf_counter() - t0:.1f} s"
            )
            workers: list[OutboundWorker] = []
            for _ in range(args.workers):
                store = Store(settings)
                await store.open()
                stores.append(store)
                workers.append(build_worker(settings, store, gw.trust, clock=gw.clock))
            deadline = time.perf_counter() + args.seconds

            async def work(worker: OutboundWorker) -> None:
                while time.perf_counter() < deadline and await worker.run_once():
                    pass

            start = time.perf_counter()
            await asyncio.gather(*(work(w) for w in workers))
            elapsed = time.perf_counter() - start
            sent = sum(w.sent for w in workers)
            left = await count(gw.store, OutboundStatus.PENDING)
            algorithm = "rsa-sha256" if args.rsa else "ed25519-sha256"
            db = "postgresql" if args.database_url else "sqlite"
            print(
                f"{sent} messages delivered in {elapsed:.2f} s = {sent / elapsed:.0f}/s"
                f" ({args.workers} worker(s), concurrency {args.concurrency}, batch"
                f" {args.batch}, DKIM {algorithm}, STARTTLS + mutual TLS, {db});"
                f" operator received {operator.received}, {left} left pending"
            )
        finally:
            for store in stores:
                with contextlib.suppress(Exception):
                    await store.close()
            await gw.stop()
            await operator.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rsa", action="store_true", help="RSA 2048 DKIM key (else Ed25519)")
    parser.add_argument("--database-url", default=None)
    asyncio.run(main(parser.parse_args()))
