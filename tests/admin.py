"""A running admin API (mssante/admin) beside a test gateway, and clients for it.

``running_admin`` starts the real :class:`AdminServer` on port 0 over TLS
(a server certificate from tests/pki.py), requiring a client certificate
from that PKI *and* a bearer token, on the gateway's store, clock and
pseudonyms.  :meth:`AdminApi.client` is an httpx client that presents the
insurer's certificate and token, or what a test chooses instead.
"""

from __future__ import annotations

import contextlib
import secrets
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select

from mssante.admin.auth import token_hash
from mssante.admin.server import AdminServer
from mssante.app import Gateway
from mssante.settings import AdminSettings
from mssante.store.models import AuditEvent
from tests.pki import Issued, Pki

INSURER_CN = "compte-assure TEST"


@dataclass
class AdminApi:
    gateway: Gateway
    server: AdminServer
    pki: Pki
    insurer: Issued  # the client certificate of the insurer's account system
    token: str
    tokens_file: Path

    @property
    def url(self) -> str:
        return self.server.url

    def tls(self, cert: Issued | None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.anchors()))
        if cert is not None:
            context.load_cert_chain(cert.cert_path, cert.key_path)
        return context

    def client(
        self, *, cert: Issued | bool | None = True, token: str | bool | None = True, **kwargs: Any
    ) -> httpx.AsyncClient:
        """``True``: the insurer's own; ``None``/``False``: none; else this one."""
        chosen_cert = self.insurer if cert is True else cert or None
        chosen_token = self.token if token is True else token or None
        headers = dict(kwargs.pop("headers", {}))
        if chosen_token is not None:
            headers["authorization"] = f"Bearer {chosen_token}"
        return httpx.AsyncClient(
            base_url=self.url,
            verify=self.tls(chosen_cert),
            headers=headers,
            timeout=30,
            **kwargs,
        )

    async def events(self, correlation: str) -> list[AuditEvent]:
        """Audit events of one admin request, in chain order."""
        async with self.gateway.store.reads() as session:
            events = await session.scalars(select(AuditEvent).order_by(AuditEvent.id))
            return [e for e in events if e.details.get("correlation") == correlation]


@contextlib.asynccontextmanager
async def running_admin(gateway: Gateway, directory: Path, **admin: Any) -> AsyncIterator[AdminApi]:
    pki = Pki(directory / "admin-pki")
    server_cert = pki.issue("admin-server", "CN=127.0.0.1,O=Admin TEST,C=FR", server=True)
    insurer = pki.issue("insurer", f"CN={INSURER_CN},O=Assurance Maladie TEST,C=FR")
    token = secrets.token_urlsafe(32)
    tokens_file = directory / "admin-tokens"
    tokens_file.write_text(f"# insurer\n{token_hash(token)}\n")
    values: dict[str, Any] = {
        "enabled": True,
        "port": 0,
        "tls_cert": server_cert.cert_path,
        "tls_key": server_cert.key_path,
        "client_ca": pki.anchors(),
        "tokens_file": tokens_file,
        **admin,
    }
    settings = gateway.settings.model_copy(update={"admin": AdminSettings(**values)})
    server = AdminServer(gateway.store, settings, clock=gateway.clock, pseudonym=gateway.pseudonym)
    await server.start()
    try:
        yield AdminApi(gateway, server, pki, insurer, token, tokens_file)
    finally:
        await server.stop()
