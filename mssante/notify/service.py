"""Building the notification parts from the settings: worker, transport, bounces.

:class:`Notifier` is what ``mssante serve`` (app.py) and ``mssante notify
run`` (notify/cli.py) start.  Everything outside is injected: the clock, the
randomness of the backoff jitter and, for tests, the transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

from mssante import dkim
from mssante.clock import Clock
from mssante.dkim import DkimSigner
from mssante.notify.bounces import BounceListener, BouncePolicy
from mssante.notify.compose import Sender
from mssante.notify.transport import FileTransport, SmarthostTransport, Transport
from mssante.notify.verp import VerpCodec, load_key
from mssante.notify.worker import NotificationWorker, RetryPolicy
from mssante.pseudonym import Pseudonymizer
from mssante.settings import NotifySettings, Settings
from mssante.smtp.tls import client_context, server_context
from mssante.store.db import is_sqlite

if TYPE_CHECKING:
    from mssante.app import Store

log = logging.getLogger("mssante.notify")


def make_transport(settings: Settings, clock: Clock) -> Transport:
    n = settings.notify
    if n.transport == "file":
        return FileTransport(n.outbox_path(settings.store.data_dir), clock)
    return SmarthostTransport(
        host=n.smarthost_host,
        port=n.smarthost_port,
        starttls=n.smarthost_starttls,
        tls_context=client_context(n.smarthost_ca) if n.smarthost_starttls else None,
        username=n.smarthost_username,
        password=n.smarthost_password.get_secret_value() if n.smarthost_password else None,
        timeout=n.smarthost_timeout,
        local_hostname=settings.smtp.hostname,
    )


def dkim_domain(n: NotifySettings) -> str:
    return n.dkim_domain or n.from_address.rpartition("@")[2]


def load_signer(settings: Settings, clock: Clock) -> DkimSigner:
    """``notify.dkim_key_file``, else a development Ed25519 key made once in data_dir/dkim."""
    n = settings.notify
    return dkim.load_signer(
        n.dkim_key_file,
        data_dir=settings.store.data_dir,
        selector=n.dkim_selector,
        domain=dkim_domain(n),
        clock=clock,
        setting="notify.dkim_key_file",
    )


def verp_codec(settings: Settings) -> VerpCodec:
    n = settings.notify
    secret = n.verp_secret.get_secret_value() if n.verp_secret else None
    return VerpCodec(
        load_key(secret, settings.store.data_dir / "verp.key"),
        bounce_domain=n.bounce_domain,
        message_id_domain=n.from_address.rpartition("@")[2],
    )


def worker_id() -> str:
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(3)}"


class Notifier:
    """The notification worker and the bounce listener of one process."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        clock: Clock,
        pseudonym: Pseudonymizer,
        transport: Transport | None = None,
        rng: random.Random | None = None,
        server_tls: tuple[Path, Path] | None = None,
    ) -> None:
        n = settings.notify
        self.settings = settings
        self.verp = verp_codec(settings)
        self.signer = load_signer(settings, clock)
        self.transport = transport or make_transport(settings, clock)
        self.worker = NotificationWorker(
            reads=store.reads,
            writer=store.writer,
            sqlite=is_sqlite(settings.store.url()),
            keyring=store.keyring,
            transport=self.transport,
            verp=self.verp,
            signer=self.signer,
            sender=Sender(
                address=n.from_address,
                name=n.from_name,
                webmail_url=n.webmail_url,
                activation_url=n.activation_url,
            ),
            clock=clock,
            rng=rng or random.Random(),  # noqa: S311 - jitter, not a secret
            policy=RetryPolicy(n.max_attempts, n.backoff_base, n.backoff_max),
            worker_id=worker_id(),
            lease=n.claim_lease,
            window=n.coalesce_window,
            batch_size=n.batch_size,
            poll_interval=n.poll_interval,
            show_sender_name=n.show_sender_name,
            pseudonym=pseudonym,
            metrics=store.metrics,
        )
        self.bounces: BounceListener | None = None
        if n.bounce_port is not None:
            tls: ssl.SSLContext | None = None
            if server_tls is not None:
                # No client certificate asked: reports come from any provider.
                tls = server_context(*server_tls)
            self.bounces = BounceListener(
                BouncePolicy(verp=self.verp, writer=store.writer, clock=clock),
                host=n.bounce_host,
                port=n.bounce_port,
                hostname=settings.smtp.hostname,
                tls_context=tls,
                metrics=store.metrics.listener("bounce"),
            )
        self._task: asyncio.Task[None] | None = None

    async def start(self, *, worker: bool = True) -> None:
        if self.bounces is not None:
            await self.bounces.start()
            log.info(
                "bounce listener on %s:%d", self.settings.notify.bounce_host, self.bounces.port
            )
        if worker:
            self._task = asyncio.create_task(self.worker.run_forever(), name="notify-worker")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.bounces is not None:
            await self.bounces.stop()
        await self.transport.close()
