"""Wiring: one visible place where the parts are built and connected.

smtp -> routing -> store -> notify (STYLE.md 1, 8).  Nothing here is
global: a :class:`Gateway` is built from a :class:`Settings` value and a
clock, so tests start as many as they like on port 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Collection
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from mssante.admin.server import AdminServer
from mssante.clock import Clock, SystemClock
from mssante.dkim import DkimVerifier, Resolver
from mssante.metrics import Metrics
from mssante.notify.service import Notifier
from mssante.ops.server import OpsServer
from mssante.outbound.queue import OutboundQueue
from mssante.outbound.replies import non_delivery_recorder
from mssante.outbound.worker import OutboundWorker, build_worker
from mssante.pseudonym import Pseudonymizer
from mssante.routing.dns import DnsTxtResolver
from mssante.routing.recipient import RecipientRouter
from mssante.routing.trust import TrustSpace, WhitelistError, read_whitelist
from mssante.settings import Settings
from mssante.smtp.limits import AbuseGuard, Limits
from mssante.smtp.listener import SmtpListener
from mssante.smtp.session import Policy
from mssante.smtp.submission import SubmissionPolicy, accept_for_parsing
from mssante.smtp.tls import ensure_dev_certificate, server_context
from mssante.store.accounts import Accounts
from mssante.store.blobs import BlobStore
from mssante.store.crypto import DirectoryKeyProvider
from mssante.store.db import SessionMaker, make_engine, make_sessionmaker
from mssante.store.directory import Directory
from mssante.store.keys import Keyring
from mssante.store.mailstore import MailStore
from mssante.store.migrations import prepare_schema
from mssante.store.reading import read_original
from mssante.store.writer import Writer
from mssante.web.server import WebServer

T = TypeVar("T")
log = logging.getLogger("mssante")

# aiosmtpd logs every command line, RCPT addresses (INS) included, at INFO,
# and aiosqlite every SQL parameter at DEBUG: keep them to warnings so no
# identity or content reaches the logs whatever the log level.
QUIET_LOGGERS = ("mail.log", "aiosqlite")


class Store:
    """Database engines, the single writer and the blob store of one data directory."""

    def __init__(
        self, settings: Settings, *, worker: int = 0, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        # The process's metrics (metrics.py); the workers built on this store record there.
        self.metrics = metrics or Metrics()
        self.data_dir = settings.store.data_dir
        url = settings.store.url()
        sync = settings.store.sqlite_synchronous
        self.read_engine: AsyncEngine = make_engine(url, synchronous=sync)
        self.write_engine: AsyncEngine = make_engine(url, synchronous=sync, writer=True)
        self.reads: SessionMaker = make_sessionmaker(self.read_engine)
        # Writer sessions: for the writer task, and for bulk tools (import)
        # that run in their own process.
        self.writer_sessions: SessionMaker = make_sessionmaker(self.write_engine)
        self.writer = Writer(
            self.writer_sessions, max_batch=settings.store.max_batch, metrics=self.metrics
        )
        self.blobs = BlobStore(self.data_dir, worker=worker)
        self.directory = Directory(self.read_engine)
        self.keys = DirectoryKeyProvider(
            settings.store.keys_path(), create=settings.store.create_master_key
        )
        self.keyring = Keyring(self.keys)
        self.outbound = OutboundQueue(
            self.blobs,
            self.keys,
            max_age=timedelta(seconds=settings.outbound.max_age),
        )

    async def open(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.blobs.prepare()
        # An empty database gets the schema (the Quick start); an outdated one
        # stops the start with SchemaError: `mssante db upgrade` migrates it.
        try:
            await prepare_schema(self.write_engine)
        except BaseException:
            await self.close()  # release the connections of a refused start
            raise
        self.writer.start()

    async def read_original(self, ref: str) -> bytes:
        """Message ``ref`` exactly as received (raises MessageNotFoundError)."""
        return await read_original(self.reads, self.blobs, self.keyring, ref)

    async def close(self) -> None:
        await self.writer.stop()
        self.directory.close()
        await self.read_engine.dispose()
        await self.write_engine.dispose()


def run_with_store(settings: Settings, fn: Callable[[Store], Awaitable[T]]) -> T:
    """For commands: open the store, run ``fn`` on it, close it (an event loop of its own)."""

    async def run() -> T:
        store = Store(settings)
        await store.open()
        try:
            return await fn(store)
        finally:
            await store.close()

    return asyncio.run(run())


class TrustConfig:
    """Whitelist, trust anchors, CRLs and the server certificate, reloadable.

    ``reload()`` rebuilds everything from the files; if anything is wrong
    (malformed whitelist, unreadable CRL...) the previous state stays in
    force and the error is logged (issue 3: a bad new file never opens the
    gates nor closes them).  Checked every ``trust.reload_interval`` seconds
    by file modification time, and on SIGHUP.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        smtp, trust = settings.smtp, settings.trust
        dev_dir = settings.store.data_dir / "tls"
        ca, cert, key = (None, smtp.tls_cert, smtp.tls_key)
        if not (smtp.tls_cert and smtp.tls_key) or not (trust.anchors and trust.whitelist):
            ca, dev_cert, dev_key = ensure_dev_certificate(dev_dir, smtp.hostname)
            log.warning(
                "development TLS material in use (%s): set smtp.tls_cert/tls_key,"
                " trust.anchors and trust.whitelist in production",
                ", ".join(
                    name
                    for name, value in (
                        ("certificate", smtp.tls_cert),
                        ("anchors", trust.anchors),
                        ("whitelist", trust.whitelist),
                    )
                    if value is None
                ),
            )
            cert, key = (smtp.tls_cert, smtp.tls_key) if smtp.tls_cert else (dev_cert, dev_key)
        assert cert is not None and key is not None
        self.cert, self.key = cert, key
        self.anchors = trust.anchors or ca
        self.whitelist = trust.whitelist or dev_dir / "dev-whitelist.xml"
        self.crls = tuple(trust.crls)
        self._stamp: tuple[float, ...] = ()
        self.space, self.tls = self._load()
        self._stamp = self._mtimes()

    def _files(self) -> list[Path]:
        anchors = [self.anchors] if self.anchors else []
        return [self.cert, self.key, self.whitelist, *anchors, *self.crls]

    def _mtimes(self) -> tuple[float, ...]:
        return tuple(p.stat().st_mtime if p.exists() else -1.0 for p in self._files())

    def _load(self) -> tuple[TrustSpace, ssl.SSLContext]:
        space = TrustSpace(
            patient_domain=self._settings.smtp.patient_domain,
            suffix=self._settings.trust.mssante_suffix,
            operators=read_whitelist(self.whitelist),
        )
        context = server_context(self.cert, self.key, anchors=self.anchors, crls=self.crls)
        return space, context

    def reload(self) -> bool:
        try:
            self.space, self.tls = self._load()
        except (OSError, ssl.SSLError, WhitelistError) as exc:
            log.error("trust reload failed, previous whitelist/CRLs/certificate kept: %s", exc)
            return False
        self._stamp = self._mtimes()
        log.info("trust reloaded: %d domains", len(self.space.operators))
        return True

    def reload_if_changed(self) -> bool:
        if self._mtimes() == self._stamp:
            return False
        return self.reload()


class Role(StrEnum):
    """What one process of the service does (``mssante serve --role``).

    Gateways are stateless and scale out behind MX records; the workers
    claim queue rows with leases, so any number of them can run; the web
    role serves the patients' webmail and the admin API.  Every role
    shares the database and the data directory (HACKING.md, scaling out).
    """

    GATEWAY = "gateway"  # SMTP MX and submission listeners
    WORKER = "worker"  # notification e-mails, bounce listener, outbound queue
    WEB = "web"  # webmail (and the admin API)


ALL_ROLES: frozenset[Role] = frozenset(Role)


class Gateway:
    """One process of the service: the store and the parts its roles run."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        dns: Resolver | None = None,
        worker: int = 0,
        roles: Collection[Role] = ALL_ROLES,
    ) -> None:
        self.settings = settings
        self.roles = frozenset(roles)
        self.stopping = False  # /readyz says 503 from the start of a graceful stop
        self.clock = clock or SystemClock()
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        # Prometheus metrics of this process (metrics.py), served by ops/.
        self.metrics = Metrics()
        self.store = Store(settings, worker=worker, metrics=self.metrics)
        self.pseudonym = Pseudonymizer.from_key_file(settings.store.data_dir / "pseudonym.key")
        self.trust = TrustConfig(settings)
        mailstore = MailStore(
            blobs=self.store.blobs,
            writer=self.store.writer,
            trust=lambda: self.trust.space,
            keyring=self.store.keyring,
            outbound=self.store.outbound,
            dkim=DkimVerifier(
                dns or DnsTxtResolver(settings.dkim.dns_timeout),
                authserv_id=settings.dkim.authserv_id or settings.smtp.hostname,
                required_domains=frozenset(settings.dkim.required_domains),
                clock=self.clock,
                dns_timeout=settings.dkim.dns_timeout,
            ),
        )
        smtp = settings.smtp
        self.accounts = Accounts(self.store.reads)
        abuse = AbuseGuard(Limits(**settings.limits.model_dump()), self.clock)
        common: dict[str, Any] = {
            "router": RecipientRouter(smtp.patient_domain, self.store.directory.lookup),
            "deliver": mailstore.deliver,
            "record_refusal": mailstore.record_refusal,
            "new_spool": self.store.blobs.new_spool,
            "max_message_size": smtp.max_message_size,
            "pseudonym": self.pseudonym,
            "hostname": smtp.hostname,
            "clock": self.clock,
            "trust": lambda: self.trust.space,
            "abuse": abuse,
        }
        listener: dict[str, Any] = {
            "hostname": smtp.hostname,
            "max_message_size": smtp.max_message_size,
            "max_header_size": smtp.max_header_size,
            "timeout": smtp.timeout,
            "tls_context": lambda: self.trust.tls,
            "reuse_port": smtp.workers > 1,
        }
        # smtp.refusal (bounce mode) is the MX's: submission clients learn at RCPT.
        policy = Policy(
            check_senders=settings.trust.require_client_certificate,
            refusal=smtp.refusal,
            metrics=self.metrics.listener("mx"),
            **common,
        )
        self.smtp = SmtpListener(
            policy, host=smtp.host, port=smtp.port, require_tls=smtp.require_tls, **listener
        )
        # Submission: senders are checked against their account, not the whitelist.
        submission = SubmissionPolicy(
            accounts=self.accounts,
            check_senders=False,
            metrics=self.metrics.listener("submission"),
            **common,
        )
        sub = settings.submission
        ports = [(sub.port, False)]
        if sub.implicit_tls_port is not None:
            ports.append((sub.implicit_tls_port, True))  # RFC 8314 implicit TLS
        self.submission: list[SmtpListener] = [
            SmtpListener(
                submission,
                host=sub.host,
                port=port,
                require_tls=True,
                implicit_tls=implicit,
                auth=accept_for_parsing,
                **listener,
            )
            for port, implicit in (ports if sub.enabled else [])
        ]
        # notify: the e-mail worker and the bounce listener (notify/service.py).
        self.notifier = Notifier(
            settings,
            self.store,
            clock=self.clock,
            pseudonym=self.pseudonym,
            server_tls=(self.trust.cert, self.trust.key),
        )
        # outbound: delivery of the outbound queue to operators (outbound/worker.py);
        # on_failure callbacks are appended to self.outbound.on_failure.
        # A reply that cannot be delivered shows a notice in its conversation.
        self.outbound: OutboundWorker = build_worker(
            settings,
            self.store,
            self.trust,
            clock=self.clock,
            on_failure=[non_delivery_recorder(self.store)],
        )
        # The patient webmail (web/).
        self.web: WebServer | None = None
        if settings.web.enabled and Role.WEB in self.roles:
            self.web = WebServer(self.store, clock=self.clock, pseudonym=self.pseudonym)
        # The admin API for the insurer's account system (admin/), beside the webmail.
        self.admin: AdminServer | None = None
        if settings.admin.enabled and Role.WEB in self.roles:
            self.admin = AdminServer(
                self.store, settings, clock=self.clock, pseudonym=self.pseudonym
            )
        # Metrics and probes (ops/), in every role: ops.port + worker index.
        self.ops: OpsServer | None = None
        if settings.ops.enabled:
            self.ops = OpsServer(
                self.store,
                metrics=self.metrics,
                clock=self.clock,
                worker=worker,
                stopping=lambda: self.stopping,
            )
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.store.open()
        if Role.GATEWAY in self.roles:
            # What a crash of this gateway left half-received was never acknowledged.
            removed = await asyncio.to_thread(self.store.blobs.clean_spool)
            if removed:
                log.warning("removed %d unfinished spool file(s) left by a crash", removed)
        if Role.WORKER in self.roles:
            await self.notifier.start(worker=self.settings.notify.worker_enabled)
            if self.settings.outbound.worker_enabled:
                self.outbound.start()
        if Role.GATEWAY in self.roles:
            await self.smtp.start()
            for listener in self.submission:
                await listener.start()
            log.info("SMTP listening on %s:%d", self.settings.smtp.host, self.smtp.port)
        if self.web is not None:
            await self.web.start()
            log.info("webmail listening on %s", self.web.url)
        if self.admin is not None:
            await self.admin.start()
            log.info("admin API listening on %s", self.admin.url)
        if self.ops is not None:
            await self.ops.start()
            log.info("metrics and probes on %s", self.ops.url)
        self._watch = asyncio.create_task(self._watch_trust_files(), name="trust-watch")

    def reload(self) -> None:
        """SIGHUP: the whitelist, trust anchors, CRLs and the SMTP certificate
        (TrustConfig: a bad file keeps the previous state), the master keys
        (`keys rotate`), and the webmail's and admin API's certificates; each
        applies to the next session, handshake or data key."""
        self.trust.reload()
        try:
            self.store.keys.reload()  # the current master key after `keys rotate`
        except (OSError, ValueError, KeyError) as exc:
            log.error("master keys reload failed, the keys in memory are kept: %s", exc)
        if self.web is not None:
            self.web.reload_certificate()
        if self.admin is not None:
            self.admin.reload_certificate()

    async def _watch_trust_files(self) -> None:
        while True:
            await asyncio.sleep(self.settings.trust.reload_interval)
            self.trust.reload_if_changed()

    async def stop(self, *, grace: float | None = None) -> None:
        """Stop every part.  With ``grace`` (SIGTERM: ``smtp.shutdown_grace``)
        the SMTP sessions in progress may first finish their transaction, new
        ones hearing ``421 4.3.2`` meanwhile (SmtpListener.shut_down); then
        the webmail finishes its requests, the workers their pass under way,
        and the writer commits what is waiting (each 250 still follows its
        commit)."""
        self.stopping = True
        if grace is not None and Role.GATEWAY in self.roles:
            listeners = [self.smtp, *self.submission]
            log.info(
                "shutting down: %d SMTP session(s) in progress, %.0f s to finish",
                sum(listener.sessions for listener in listeners),
                grace,
            )
            cut = await asyncio.gather(*(listener.shut_down(grace) for listener in listeners))
            if sum(cut):
                log.warning("shutdown deadline: %d SMTP session(s) cut with 421 4.3.2", sum(cut))
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self.web is not None:
            await self.web.stop()
        if self.admin is not None:
            await self.admin.stop()
        for listener in self.submission:
            await listener.stop()
        await self.smtp.stop()
        await self.outbound.stop()
        await self.notifier.stop()
        await self.store.close()
        if self.ops is not None:  # last: probes and metrics answer while the rest stops
            await self.ops.stop()
