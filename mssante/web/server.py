"""The webmail's HTTP server: uvicorn, in the process that runs the gateway.

``mssante serve`` starts it beside the SMTP listeners (in the first worker
only when there are several); with ``web.tls_cert`` it speaks HTTPS.  No
access log: URLs carry conversation ids, and the logs of issue 9 say what
is logged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import uvicorn

from mssante.clock import Clock
from mssante.httpserver import EmbeddedHttpServer
from mssante.pseudonym import Pseudonymizer
from mssante.web.app import create_app

if TYPE_CHECKING:
    from mssante.app import Store
    from mssante.notify.transport import Transport


class WebServer(EmbeddedHttpServer):
    def __init__(
        self,
        store: Store,
        *,
        clock: Clock,
        pseudonym: Pseudonymizer,
        transport: Transport | None = None,
    ) -> None:
        web = store.settings.web
        self.app = create_app(store, clock=clock, pseudonym=pseudonym, transport=transport)
        config = uvicorn.Config(
            self.app,
            host=web.host,
            port=web.port,
            log_config=None,
            access_log=False,
            lifespan="off",
            proxy_headers=web.behind_tls_proxy,
            server_header=False,
            ssl_certfile=str(web.tls_cert) if web.tls_cert else None,
            ssl_keyfile=str(web.tls_key) if web.tls_key else None,
            h11_max_incomplete_event_size=64 * 1024,
        )
        super().__init__(config, name="webmail")
