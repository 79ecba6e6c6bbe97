"""The outside world of the outbound tests: fake professional operators and DNS.

:class:`FakeOperator` is a real aiosmtpd server on 127.0.0.1 port 0 with
real STARTTLS (certificates from tests/pki.py) that *requires* a client
certificate chaining to the same anchors and records its subject.  Failure
switches:

- ``temp_failures = N``: answer ``451`` at the end of DATA to the next N messages;
- ``permanent = True``: ``550 5.1.1`` to every RCPT;
- ``refuse[address] = "550 ..."``: one recipient's own RCPT reply;
- ``certificate``: ``"good"``, ``"rogue"`` (same subject, another CA),
  ``"impostor"`` (right CA, a subject that is not the listed operator's),
  ``"revoked"`` (right CA and subject, revoked in the CRL);
- ``starttls = False``: STARTTLS not offered;
- ``hold()``: keep each message at the end of DATA until ``release()``
  (slow operator: timeouts; concurrency).

``connections`` counts TCP connections accepted (a domain outside the
whitelist must leave it at 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP
from cryptography import x509

from mssante.smtp.tls import server_context
from tests.pki import Pki, whitelist_xml

PATIENT_DN = "CN=mx.patient.mssante.test,O=Operateur Usagers,C=FR"
CHU_DN = "CN=mx.test.localhost,O=CHU Exemple,C=FR"
CLINIQUE_DN = "CN=mx.test.localhost,O=Clinique Exemple,C=FR"
IMPOSTOR_DN = "CN=mx.test.localhost,O=Imposteur,C=FR"
CHU = "chu.mssante.fr"
CLINIQUE = "clinique.mssante.fr"
# Ends with .mssante.fr, routed to a running fake, but NOT in the whitelist.
UNLISTED = "intrus.mssante.fr"


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    client_dn: str
    mail_options: list[str]


@dataclass
class TrustWorld:
    """One test PKI: anchors, CRL, whitelist, our client certificate."""

    directory: Path
    pki: Pki = field(init=False)
    anchors: Path = field(init=False)
    crl: Path = field(init=False)
    whitelist: Path = field(init=False)
    client_cert: Path = field(init=False)
    client_key: Path = field(init=False)

    def __post_init__(self) -> None:
        self.pki = Pki(self.directory / "pki")
        self.anchors = self.pki.anchors()
        client = self.pki.issue("patient-operator", PATIENT_DN)
        self.client_cert, self.client_key = client.cert_path, client.key_path
        self.whitelist = self.directory / "whitelist.xml"
        self.whitelist.write_text(
            whitelist_xml({CHU: CHU_DN, CLINIQUE: CLINIQUE_DN}), encoding="utf-8"
        )
        self.crl = self.pki.crl()


class FakeOperator:
    def __init__(self, world: TrustWorld, name: str, dn: str) -> None:
        pki = world.pki
        d = world.directory
        good = pki.issue(f"{name}-server", dn, server=True)
        impostor = pki.issue(f"{name}-impostor", IMPOSTOR_DN, server=True)
        revoked = pki.issue(f"{name}-revoked", dn, server=True)
        pki.revoke(revoked.cert)
        world.crl = pki.crl()
        rogue = Pki(d / f"{name}-rogue", prefix="ROGUE").issue("rogue", dn, server=True)
        self._contexts = {
            "good": self._context(good.cert_path, good.key_path, world.anchors),
            "impostor": self._context(impostor.cert_path, impostor.key_path, world.anchors),
            "revoked": self._context(revoked.cert_path, revoked.key_path, world.anchors),
            "rogue": self._context(rogue.cert_path, rogue.key_path, world.anchors),
        }
        # Failure switches.
        self.temp_failures = 0
        self.permanent = False
        self.refuse: dict[str, str] = {}
        self.certificate = "good"
        self.starttls = True
        self._gate: asyncio.Event | None = None
        # What happened.
        self.received: list[Received] = []
        self.connections = 0
        self.waiting = 0
        self._changed = asyncio.Condition()
        self._server: asyncio.Server | None = None

    @staticmethod
    def _context(cert: Path, key: Path, anchors: Path) -> ssl.SSLContext:
        context = server_context(cert, key, anchors=anchors)
        # A professional operator requires the patient operator's certificate.
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    # --- switches -------------------------------------------------------------
    def hold(self) -> None:
        self._gate = asyncio.Event()

    def release(self) -> None:
        if self._gate is not None:
            self._gate.set()
        self._gate = None

    async def wait_received(self, n: int) -> None:
        """Until ``n`` messages were accepted."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: len(self.received) >= n), 60)

    async def wait_waiting(self, n: int) -> None:
        """Until ``n`` messages are held at the end of DATA at the same time."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: self.waiting >= n), 30)

    # --- server ---------------------------------------------------------------
    def _protocol(self) -> SMTP:
        self.connections += 1
        return SMTP(
            _Handler(self),
            hostname="mx.test.localhost",
            tls_context=self._contexts[self.certificate] if self.starttls else None,
            require_starttls=self.starttls,
            loop=asyncio.get_running_loop(),
        )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, "127.0.0.1", 0)

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def hop(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _data(self, session: Any, envelope: Any) -> str:
        gate = self._gate
        if gate is not None:
            async with self._changed:
                self.waiting += 1
                self._changed.notify_all()
            try:
                await gate.wait()
            finally:
                self.waiting -= 1
        if self.temp_failures > 0:
            self.temp_failures -= 1
            return "451 4.3.0 Service momentanement indisponible"
        der = session.ssl["ssl_object"].getpeercert(binary_form=True)
        dn = x509.load_der_x509_certificate(der).subject.rfc4514_string()
        async with self._changed:
            self.received.append(
                Received(
                    envelope.mail_from,
                    list(envelope.rcpt_tos),
                    envelope.content,
                    dn,
                    list(envelope.mail_options),
                )
            )
            self._changed.notify_all()
        return "250 2.0.0 Ok: queued as FAKE"


class _Handler:
    def __init__(self, fake: FakeOperator) -> None:
        self._fake = fake

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if self._fake.permanent:
            return "550 5.1.1 Destinataire inconnu"
        if address in self._fake.refuse:
            return self._fake.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return await self._fake._data(session, envelope)


@contextlib.asynccontextmanager
async def running_operator(world: TrustWorld, name: str, dn: str) -> AsyncIterator[FakeOperator]:
    fake = FakeOperator(world, name, dn)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


class FakeMx:
    """DNS MX answers by domain (tests/outbound): records, or an exception to raise."""

    def __init__(self, answers: dict[str, list[tuple[int, str]] | Exception]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def __call__(self, domain: str) -> list[tuple[int, str]]:
        self.asked.append(domain)
        answer = self.answers[domain]
        if isinstance(answer, Exception):
            raise answer
        return answer


MESSAGE = (
    b"From: =?utf-8?q?Camille_Martin?= <146026322000196@patient.mssante.fr>\r\n"
    b"To: dr.durand@chu.mssante.fr\r\n"
    b"Subject: Re: resultats\r\n"
    b"Date: Mon, 23 Nov 2026 09:00:00 +0000\r\n"
    b"Message-ID: <reply-1@patient.mssante.fr>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Merci docteur, contenu confidentiel.\r\n"
)
PATIENT_FROM = "146026322000196@patient.mssante.fr"
