"""What every webmail request handler needs, built once by :func:`mssante.web.app.create_app`.

Nothing global (STYLE.md 9): handlers read it from ``request.app.state.web``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.templating import Jinja2Templates

from mssante.clock import Clock
from mssante.pseudonym import Pseudonymizer
from mssante.settings import Settings

if TYPE_CHECKING:
    from mssante.app import Store
    from mssante.notify.transport import Transport


@dataclass(frozen=True, slots=True)
class Web:
    store: Store
    settings: Settings
    clock: Clock
    pseudonym: Pseudonymizer
    templates: Jinja2Templates
    # Cookies marked Secure and HSTS sent: the webmail speaks TLS itself or
    # sits behind a TLS proxy (web.behind_tls_proxy).
    secure: bool
    # Where the activation codes go (the notification transport); None: the
    # one notify settings describe, built per use.
    transport: Transport | None = None


def web(request: Request) -> Web:
    value: Web = request.app.state.web
    return value
