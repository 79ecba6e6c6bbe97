"""The admin API's HTTP server: uvicorn, in the process that runs the webmail.

Embedded like the webmail (httpserver.py): no access log (URLs carry the
INS; gate.py writes one line per request without it).  With ``admin.client_ca`` the TLS
handshake requires a client certificate issued by those CAs
(``CERT_REQUIRED``): a client without one, or with another CA's, is
refused before any HTTP.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING, Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from mssante.admin.api import create_app
from mssante.admin.auth import CLIENT_CN
from mssante.clock import Clock
from mssante.httpserver import EmbeddedHttpServer
from mssante.pseudonym import Pseudonymizer
from mssante.settings import Settings

if TYPE_CHECKING:
    from mssante.app import Store


def _common_name(peer: dict[str, Any] | None) -> str | None:
    for rdn in (peer or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


class _ClientCertificateProtocol(H11Protocol):
    """HTTP/1.1 that hands the verified client certificate's CN to the application.

    uvicorn puts no TLS details in the ASGI scope; each request's scope gets
    a copy of the connection's ``app_state``, so the CN is added to this
    connection's copy once the handshake (which asyncio completes before
    ``connection_made``) has verified the certificate.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if isinstance(ssl_object, ssl.SSLObject):
            cn = _common_name(ssl_object.getpeercert())
            if cn is not None:
                self.app_state = {**self.app_state, CLIENT_CN: cn}


class AdminServer(EmbeddedHttpServer):
    def __init__(
        self, store: Store, settings: Settings, *, clock: Clock, pseudonym: Pseudonymizer
    ) -> None:
        admin = settings.admin
        self.app = create_app(store, settings, clock=clock, pseudonym=pseudonym)
        tls: dict[str, Any] = {}
        if admin.tls_cert is not None:
            tls = {"ssl_certfile": str(admin.tls_cert), "ssl_keyfile": str(admin.tls_key)}
        if admin.client_ca is not None:
            tls |= {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(admin.client_ca)}
        config = uvicorn.Config(
            self.app,
            host=admin.host,
            port=admin.port,
            http=_ClientCertificateProtocol,
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
            date_header=False,
            h11_max_incomplete_event_size=64 * 1024,
            **tls,
        )
        super().__init__(config, name="admin API")
