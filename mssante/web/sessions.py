"""Webmail sessions, kept on the server (table ``web_sessions``).

The cookie carries a random token; the database keeps its SHA-256 only, so
a copy of the database opens no session.  A session ends on logout, after
``web.idle_timeout`` without a request, ``web.absolute_timeout`` after it
started, or when the mailbox is closed.  Logging in always starts a new
session (the old token is dropped: no session fixation).

CSRF (issue 8.9): every form carries a token.  With a session it is the
session's own token; before login (the login and activation forms) it is
a double-submit token: a random cookie whose value the form repeats.  Both
cookies are HttpOnly, SameSite=Strict and, on TLS, Secure with the
``__Host-`` prefix.  A POST whose Origin header names another site is
refused as well.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, update
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response

from mssante.store.models import WebSession
from mssante.web.context import Web, web

# Written at most this often when a session is only being used (idle timeout
# bookkeeping): a page view is a read, not a write, most of the time.
_TOUCH_EVERY = timedelta(seconds=30)


@dataclass(slots=True)
class Session:
    id: str  # SHA-256 of the cookie token
    patient_id: int | None
    acting_for: int | None
    csrf: str
    created_at: datetime
    last_seen_at: datetime
    expires_at: datetime
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def mailbox(self) -> int | None:
        """The patient whose mailbox is shown: a represented minor's, or one's own."""
        return self.acting_for if self.acting_for is not None else self.patient_id


class CsrfError(Exception):
    """A POST without the right token, or from another site."""


def cookie_name(w: Web, base: str) -> str:
    # RFC 6265bis 4.1.3.2: __Host- cookies are Secure, host-only, Path=/.
    return f"__Host-{base}" if w.secure else base


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _set_cookie(w: Web, response: Response, base: str, value: str) -> None:
    response.set_cookie(
        cookie_name(w, base),
        value,
        httponly=True,
        secure=w.secure,
        samesite="strict",
        path="/",
    )


async def load(request: Request) -> Session | None:
    """The request's live session, or None (no cookie, unknown, ended or timed out)."""
    if "session" in request.scope.get("state", {}):
        cached: Session | None = request.state.session
        return cached
    w = web(request)
    found = await _load(w, request.cookies.get(cookie_name(w, "session")))
    request.state.session = found
    return found


async def _load(w: Web, token: str | None) -> Session | None:
    if not token or len(token) > 100:
        return None
    sid = _digest(token)
    async with w.store.reads() as db:
        row = await db.get(WebSession, sid)
    if row is None:
        return None
    now = w.clock.now()
    idle = timedelta(seconds=w.settings.web.idle_timeout)
    if now >= row.expires_at or now >= row.last_seen_at + idle:
        await end(w, sid)
        return None
    session = Session(
        id=row.id,
        patient_id=row.patient_id,
        acting_for=row.acting_for,
        csrf=row.csrf,
        created_at=row.created_at,
        last_seen_at=row.last_seen_at,
        expires_at=row.expires_at,
        state=dict(row.state or {}),
    )
    if now - row.last_seen_at >= _TOUCH_EVERY:
        await _write(w, sid, last_seen_at=now)
        session.last_seen_at = now
    return session


async def start(
    w: Web,
    response: Response,
    *,
    patient_id: int | None,
    state: dict[str, Any] | None = None,
    replacing: Session | None = None,
    lifetime: float | None = None,
) -> Session:
    """A new session (and its cookie), ending ``replacing``: rotation at each step up."""
    token = secrets.token_urlsafe(32)
    now = w.clock.now()
    absolute = timedelta(seconds=lifetime or w.settings.web.absolute_timeout)
    session = Session(
        id=_digest(token),
        patient_id=patient_id,
        acting_for=None,
        csrf=secrets.token_urlsafe(32),
        created_at=now,
        last_seen_at=now,
        expires_at=now + absolute,
        state=state or {},
    )

    async def job(db: AsyncSession) -> None:
        if replacing is not None:
            await db.execute(delete(WebSession).where(WebSession.id == replacing.id))
        db.add(
            WebSession(
                id=session.id,
                patient_id=session.patient_id,
                acting_for=None,
                csrf=session.csrf,
                state=session.state,
                created_at=now,
                last_seen_at=now,
                expires_at=session.expires_at,
            )
        )

    await w.store.writer.run(job)
    _set_cookie(w, response, "session", token)
    return session


async def _write(w: Web, sid: str, **values: Any) -> None:
    async def job(db: AsyncSession) -> None:
        await db.execute(update(WebSession).where(WebSession.id == sid).values(**values))

    await w.store.writer.run(job)


async def save_state(w: Web, session: Session) -> None:
    await _write(w, session.id, state=session.state)


async def act_for(w: Web, session: Session, patient_id: int | None) -> None:
    """Show another mailbox (the caller checked the link) or, with None, one's own."""
    session.acting_for = patient_id
    await _write(w, session.id, acting_for=patient_id)


async def end(w: Web, sid: str) -> None:
    async def job(db: AsyncSession) -> None:
        await db.execute(delete(WebSession).where(WebSession.id == sid))

    await w.store.writer.run(job)


def forget(w: Web, response: Response) -> None:
    response.delete_cookie(
        cookie_name(w, "session"), path="/", secure=w.secure, httponly=True, samesite="strict"
    )


# --- CSRF --------------------------------------------------------------------------------


def anonymous_csrf(request: Request) -> tuple[str, bool]:
    """The double-submit token of a form shown before login, and whether it is new
    (then :func:`remember_csrf` sets its cookie on the response)."""
    token = request.cookies.get(cookie_name(web(request), "csrf"))
    if token and 20 <= len(token) <= 100:
        return token, False
    return secrets.token_urlsafe(32), True


def remember_csrf(request: Request, response: Response, token: str) -> None:
    _set_cookie(web(request), response, "csrf", token)


def check_csrf(request: Request, form: FormData, session: Session | None) -> None:
    """Raise CsrfError unless the POST carries the right token and comes from this site."""
    origin = request.headers.get("origin")
    if origin is not None and origin != "null":
        expected = f"{request.url.scheme}://{request.url.netloc}"
        if origin != expected:
            raise CsrfError("cross-origin POST")
    elif origin == "null":
        raise CsrfError("opaque origin")
    sent = form.get("csrf")
    if not isinstance(sent, str) or not sent:
        raise CsrfError("no token")
    if session is not None:
        expected_token = session.csrf
    else:
        expected_token = request.cookies.get(cookie_name(web(request), "csrf")) or ""
    if not expected_token or not hmac.compare_digest(sent.encode(), expected_token.encode()):
        raise CsrfError("wrong token")
