"""Wiring: one visible place where the parts are built and connected.

smtp -> routing -> store -> notify (STYLE.md 1, 8).  Nothing here is
global: a :class:`Gateway` is built from a :class:`Settings` value and a
clock, so tests start as many as they like on port 0.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

from mssante.clock import Clock, SystemClock
from mssante.pseudonym import Pseudonymizer
from mssante.routing.recipient import RecipientRouter
from mssante.routing.trust import TrustSpace, read_whitelist_domains
from mssante.settings import Settings
from mssante.smtp.listener import SmtpListener
from mssante.smtp.session import Policy
from mssante.smtp.tls import ensure_dev_certificate, server_context
from mssante.store.blobs import BlobStore
from mssante.store.crypto import load_key_provider
from mssante.store.db import SessionMaker, create_schema, make_engine, make_sessionmaker
from mssante.store.directory import Directory
from mssante.store.keys import Keyring
from mssante.store.mailstore import MailStore
from mssante.store.reading import read_original
from mssante.store.writer import Writer

log = logging.getLogger("mssante")

# aiosmtpd logs every command line, RCPT addresses (INS) included, at INFO,
# and aiosqlite every SQL parameter at DEBUG: keep them to warnings so no
# identity or content reaches the logs whatever the log level.
QUIET_LOGGERS = ("mail.log", "aiosqlite")


class Store:
    """Database engines, the single writer and the blob store of one data directory."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.data_dir = settings.store.data_dir
        url = settings.store.url()
        sync = settings.store.sqlite_synchronous
        self.read_engine: AsyncEngine = make_engine(url, synchronous=sync)
        self.write_engine: AsyncEngine = make_engine(url, synchronous=sync, writer=True)
        self.reads: SessionMaker = make_sessionmaker(self.read_engine)
        # Writer sessions: for the writer task, and for bulk tools (import)
        # that run in their own process.
        self.writer_sessions: SessionMaker = make_sessionmaker(self.write_engine)
        self.writer = Writer(self.writer_sessions, max_batch=settings.store.max_batch)
        self.blobs = BlobStore(self.data_dir)
        self.directory = Directory(self.reads)
        self.keyring = Keyring(
            load_key_provider(settings.store.keys_path(), create=settings.store.create_master_key)
        )

    async def open(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.blobs.prepare()
        await create_schema(self.write_engine)
        self.writer.start()

    async def read_original(self, ref: str) -> bytes:
        """Message ``ref`` exactly as received (raises MessageNotFoundError)."""
        return await read_original(self.reads, self.blobs, self.keyring, ref)

    async def close(self) -> None:
        await self.writer.stop()
        await self.read_engine.dispose()
        await self.write_engine.dispose()


def tls_files(settings: Settings) -> tuple[Path, Path]:
    smtp = settings.smtp
    if smtp.tls_cert and smtp.tls_key:
        return smtp.tls_cert, smtp.tls_key
    _, cert, key = ensure_dev_certificate(settings.store.data_dir / "tls", smtp.hostname)
    return cert, key


def trust_space(settings: Settings) -> TrustSpace:
    domains = (
        read_whitelist_domains(settings.trust.whitelist)
        if settings.trust.whitelist
        else frozenset()
    )
    return TrustSpace(
        patient_domain=settings.smtp.patient_domain,
        suffix=settings.trust.mssante_suffix,
        domains=domains,
    )


class Gateway:
    """The running service: store and SMTP listener."""

    def __init__(self, settings: Settings, *, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        self.store = Store(settings)
        self.pseudonym = Pseudonymizer.from_key_file(settings.store.data_dir / "pseudonym.key")
        mailstore = MailStore(
            blobs=self.store.blobs,
            writer=self.store.writer,
            trust=trust_space(settings),
            keyring=self.store.keyring,
        )
        smtp = settings.smtp
        policy = Policy(
            router=RecipientRouter(smtp.patient_domain, self.store.directory.lookup),
            deliver=mailstore.deliver,
            record_refusal=mailstore.record_refusal,
            new_spool=self.store.blobs.new_spool,
            max_message_size=smtp.max_message_size,
            pseudonym=self.pseudonym,
            hostname=smtp.hostname,
            clock=self.clock,
        )
        cert, key = tls_files(settings)
        self.smtp = SmtpListener(
            policy,
            host=smtp.host,
            port=smtp.port,
            hostname=smtp.hostname,
            max_message_size=smtp.max_message_size,
            timeout=smtp.timeout,
            tls_context=server_context(cert, key),
        )

    async def start(self) -> None:
        await self.store.open()
        await self.smtp.start()
        log.info("SMTP listening on %s:%d", self.settings.smtp.host, self.smtp.port)

    async def stop(self) -> None:
        await self.smtp.stop()
        await self.store.close()
