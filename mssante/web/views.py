"""Rendering helpers shared by the pages: the layout's context, dates in French, guards."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from mssante.french import french_date as _french_date
from mssante.french import french_datetime as _french_datetime
from mssante.store import audit
from mssante.store.mailbox import represented
from mssante.store.models import Patient
from mssante.web import sessions
from mssante.web.context import Web, web
from mssante.web.sessions import Session


def french_date(value: datetime | date | None) -> str:
    return "" if value is None else _french_date(value)


def french_datetime(value: datetime | None) -> str:
    return "" if value is None else _french_datetime(value)


def person_name(patient: Patient) -> str:
    name = " ".join(p for p in (patient.given_name, patient.family_name) if p)
    return name or "Patient"


@dataclass(frozen=True, slots=True)
class Profile:
    """A mailbox the logged-in person may open: their own or a represented person's."""

    patient_id: int
    name: str
    own: bool
    current: bool


async def page(
    request: Request,
    template: str,
    context: dict[str, Any],
    status: int = 200,
    *,
    with_session: bool = True,
) -> Response:
    """Render ``template`` inside the layout, with the CSRF token of its forms."""
    w = web(request)
    session = await sessions.load(request) if with_session else None
    new_token: str | None = None
    if session is not None:
        csrf = session.csrf
    else:
        csrf, is_new = sessions.anonymous_csrf(request)
        new_token = csrf if is_new else None
    full = {"session": session, "csrf": csrf, "profiles": [], "viewer": None, **context}
    if session is not None and session.patient_id is not None and "profiles" not in context:
        full["viewer"], full["profiles"] = await profiles(request, session)
    response = w.templates.TemplateResponse(request, template, full, status_code=status)
    if new_token is not None:
        sessions.remember_csrf(request, response, new_token)
    return response


async def profiles(request: Request, session: Session) -> tuple[str, list[Profile]]:
    """The viewer's name and the profiles of the profile menu (their own first)."""
    w = web(request)
    assert session.patient_id is not None
    async with w.store.reads() as db:
        me = await db.get(Patient, session.patient_id)
        others = await represented(db, session.patient_id)
    if me is None:
        raise HTTPException(303, headers={"location": "/connexion"})
    mailbox = session.mailbox
    result = [Profile(me.id, person_name(me), True, mailbox == me.id)]
    result += [Profile(o.patient_id, o.name, False, mailbox == o.patient_id) for o in others]
    return person_name(me), result


async def logged_in(request: Request) -> Session:
    """The session of a logged-in patient, or LoginRequired (answered by a redirect)."""
    session = await sessions.load(request)
    if session is None or session.patient_id is None or session.state.get("pending_totp"):
        raise HTTPException(303, headers={"location": "/connexion"})
    return session


def redirect(url: str) -> RedirectResponse:
    # 303: after a POST the browser GETs the next page (no resubmission).
    return RedirectResponse(url, status_code=303)


async def record(w: Web, kind: str, patient_id: int | None, **details: Any) -> None:
    """An audit event of the webmail (actor ``web``), through the single writer."""

    async def job(db: Any) -> None:
        await audit.append(
            db, at=w.clock.now(), kind=kind, actor="web", patient_id=patient_id, details=details
        )

    await w.store.writer.run(job)
