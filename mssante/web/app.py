"""The webmail application: routes, templates and middleware in one visible place.

Pages live in auth.py (activation, login, account, closing) and pages.py
(mailbox, conversation, reply, trash, history, profiles); both only call
the store's functions (store/mailbox.py, store/credentials.py,
outbound/replies.py).  Errors become pages in French: 404 for anything not
found *or not yours* (no id probing), 403 for a bad CSRF token, and a
temporary error with a log reference for internal errors, never a trace.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from mssante.clock import Clock
from mssante.pseudonym import Pseudonymizer
from mssante.web import auth, health, pages
from mssante.web.context import Web
from mssante.web.render import display_subject
from mssante.web.security import (
    ASGIApp,
    BodyTooLargeError,
    Message,
    Receive,
    Scope,
    SecurityHeaders,
    Send,
)
from mssante.web.sessions import CsrfError
from mssante.web.views import french_date, french_datetime, page

if TYPE_CHECKING:
    from mssante.app import Store
    from mssante.notify.transport import Transport

log = logging.getLogger("mssante.web")
HERE = Path(__file__).parent


def create_app(
    store: Store,
    *,
    clock: Clock,
    pseudonym: Pseudonymizer,
    transport: Transport | None = None,
) -> SecurityHeaders:
    settings = store.settings
    templates = Jinja2Templates(directory=HERE / "templates")
    env = templates.env
    env.filters["subject"] = display_subject
    env.filters["date"] = french_date
    env.filters["datetime"] = french_datetime
    env.globals["service_name"] = "Messagerie de santé"
    secure = settings.web.tls_cert is not None or settings.web.behind_tls_proxy
    app = Starlette(
        routes=[
            *auth.routes,
            *pages.routes,
            *health.routes,
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ],
        exception_handlers={
            HTTPException: _http_error,
            CsrfError: _csrf_error,
            BodyTooLargeError: _too_large,
        },
        # Inside Starlette's ServerErrorMiddleware, which would log the
        # exception a second time and drop the connection.
        middleware=[Middleware(InternalErrors)],
    )
    app.state.web = Web(
        store=store,
        settings=settings,
        clock=clock,
        pseudonym=pseudonym,
        templates=templates,
        secure=secure,
        transport=transport,
    )
    return SecurityHeaders(app, hsts=secure, max_body=settings.web.max_upload)


_TITLES = {
    404: ("Page introuvable", "Cette page n'existe pas ou vous n'y avez pas accès."),
    405: ("Action impossible", "Cette action n'est pas possible ici."),
}


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if 300 <= exc.status_code < 400 and exc.headers and "location" in exc.headers:
        return RedirectResponse(exc.headers["location"], status_code=exc.status_code)
    title, text = _TITLES.get(exc.status_code, ("Erreur", "La demande n'a pas pu aboutir."))
    return await page(request, "error.html", {"title": title, "text": text}, exc.status_code)


async def _csrf_error(request: Request, exc: Exception) -> Response:
    log.info("web: POST refused (%s) on %s", exc, request.url.path)
    return await page(
        request,
        "error.html",
        {
            "title": "Formulaire expiré",
            "text": "Ce formulaire a expiré ou ne vient pas de ce site. "
            "Revenez à la page précédente, rechargez-la et recommencez.",
        },
        403,
    )


async def _too_large(request: Request, exc: Exception) -> Response:
    return await page(
        request,
        "error.html",
        {"title": "Envoi trop volumineux", "text": "La taille de l'envoi dépasse la limite."},
        413,
    )


class InternalErrors:
    """An unexpected exception becomes a French page with a log reference, never a trace."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            ref = secrets.token_hex(6)
            log.exception("web: internal error ref=%s on %s", ref, scope.get("path"))
            if started:  # too late for a page: the connection is closed by the server
                raise
            request = Request(scope)
            context: dict[str, Any] = {
                "title": "Service momentanément indisponible",
                "text": "Une erreur est survenue. Réessayez dans quelques instants"
                f" (référence {ref}).",
            }
            response = await page(request, "error.html", context, 500, with_session=False)
            await response(scope, receive, send)
