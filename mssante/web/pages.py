"""Mailbox pages: conversation list, conversation, attachments, reply, trash, history, profiles.

Every handler starts from the logged-in session and the mailbox it shows
(``session.mailbox``: the patient's own, or a represented person's after a
check of the link on *every* request).  Objects are looked up through that
mailbox: an id from another mailbox answers 404 exactly like an id that
does not exist.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mssante.outbound.attachments import Attachment
from mssante.outbound.mdn import on_first_display
from mssante.outbound.replies import Refused, reply
from mssante.store import mailbox
from mssante.store.models import Patient
from mssante.web import render, sessions
from mssante.web.context import Web, web
from mssante.web.forms import Errors, read_form, text, uploads
from mssante.web.sessions import Session
from mssante.web.views import logged_in, page, record, redirect

INFO = {
    "sent": "Votre message a été envoyé.",
    "trashed": "La conversation a été placée dans la corbeille.",
    "message_trashed": "Le message a été placé dans la corbeille.",
    "restored": "Le message a été restauré.",
    "activated": "Votre messagerie est activée. Bienvenue !",
    "totp": "La double authentification est activée.",
    "totp_off": "La double authentification est désactivée.",
    "profile": "Profil changé.",
}


# Which form field a refusal of outbound/replies.py is about.
_FIELD_OF = {
    "attachment_type": "pieces_jointes",
    "too_many_attachments": "pieces_jointes",
    "too_large": "pieces_jointes",
}


def info(request: Request) -> str | None:
    return INFO.get(request.query_params.get("info", ""))


async def mailbox_of(request: Request) -> tuple[Web, Session, int]:
    """The session and the patient id of the mailbox shown, link checked now."""
    w = web(request)
    session = await logged_in(request)
    assert session.patient_id is not None
    target = session.mailbox
    assert target is not None
    if target != session.patient_id:
        async with w.store.reads() as db:
            allowed = await mailbox.may_act_for(db, session.patient_id, target)
        if allowed is None:
            # The link was removed since the switch: back to one's own mailbox.
            await sessions.act_for(w, session, None)
            target = session.patient_id
    return w, session, target


def _page_number(request: Request) -> int:
    try:
        return max(1, min(int(request.query_params.get("page", "1")), 100_000))
    except ValueError:
        return 1


def _id(request: Request, name: str) -> int:
    try:
        value = int(request.path_params[name])
    except (KeyError, ValueError):
        raise HTTPException(404) from None
    if not 0 < value < 2**62:
        raise HTTPException(404)
    return value


def _author(session: Session) -> int | None:
    """Who writes when the mailbox shown is someone else's (a helper, a representative)."""
    if session.acting_for is None or session.acting_for == session.patient_id:
        return None
    return session.patient_id


async def home(request: Request) -> Response:
    session = await sessions.load(request)
    if session is None or session.patient_id is None:
        return redirect("/connexion")
    return redirect("/messages")


async def conversations(request: Request, *, trash: bool = False) -> Response:
    w, _session, target = await mailbox_of(request)
    async with w.store.reads() as db:
        listing = await mailbox.list_conversations(
            db,
            w.store.keyring,
            target,
            page=_page_number(request),
            per_page=w.settings.web.page_size,
            trash=trash,
        )
    return await page(
        request,
        "conversations.html",
        {
            "title": "Corbeille" if trash else "Messages",
            "nav": "corbeille" if trash else "messages",
            "listing": listing,
            "trash": trash,
            "info": info(request),
        },
    )


async def trash_list(request: Request) -> Response:
    return await conversations(request, trash=True)


async def show_conversation(request: Request) -> Response:
    w, session, target = await mailbox_of(request)
    conv_id = _id(request, "conversation")
    trash = request.query_params.get("corbeille") == "1"
    async with w.store.reads() as db:
        detail = await mailbox.conversation(
            db, w.store.keyring, target, conv_id, trash=trash, author_patient_id=_author(session)
        )
    if detail is None:
        raise HTTPException(404)
    bodies = await _bodies(w, target, detail)
    await _first_display(w, session, target, detail)
    return await page(
        request,
        "conversation.html",
        {
            "title": render.display_subject(detail.subject),
            "nav": "corbeille" if trash else "messages",
            "conv": detail,
            "bodies": bodies,
            "trash": trash,
            "errors": Errors(),
            "body_text": "",
            "info": info(request),
        },
    )


async def _bodies(w: Web, target: int, detail: Any) -> dict[int, render.DisplayMessage]:
    """Each message's displayable body: keys in one query, then read, decrypted and
    parsed in one worker thread (not on the event loop)."""
    async with w.store.reads() as db:
        keys = await mailbox.messages_for_display(
            db, w.store.keyring, target, [m.delivery_id for m in detail.messages]
        )
    blobs = w.store.blobs

    def read_all() -> dict[int, render.DisplayMessage]:
        return {d: render.parse(blobs.read(blob, key)) for d, (blob, key) in keys.items()}

    return await asyncio.to_thread(read_all)


async def _first_display(w: Web, session: Session, target: int, detail: Any) -> None:
    """Read receipts (RFC 8098) and the read mark, on the first display (outbound/mdn.py)."""
    for entry in detail.messages:
        if not entry.read:
            await on_first_display(
                w.store, patient_id=target, delivery_id=entry.delivery_id, at=w.clock.now()
            )
    if target != session.patient_id:
        await record(w, "web.helper_access", target, by=session.patient_id)


async def download(request: Request) -> Response:
    w, _session, target = await mailbox_of(request)
    delivery_id = _id(request, "delivery")
    index = _id(request, "index") - 1
    async with w.store.reads() as db:
        found = await mailbox.message_for_download(db, w.store.keyring, target, delivery_id)
    if found is None:
        raise HTTPException(404)
    message, key = found
    raw = await asyncio.to_thread(w.store.blobs.read, message.blob_key, key)
    item = await asyncio.to_thread(render.attachment, raw, index)
    if item is None:
        raise HTTPException(404)
    return Response(
        item.data,
        media_type=item.content_type,
        headers={
            "content-disposition": render.content_disposition(item.filename),
            "x-content-type-options": "nosniff",
            # An attachment opened in the browser is a document of its own:
            # sandboxed, no script (CSP sandbox).
            "content-security-policy": "default-src 'none'; sandbox",
        },
    )


async def _attachments(form: FormData) -> list[Attachment]:
    """The uploaded files, read; then every file of the form is closed (Starlette
    leaves that to the caller: their spooled temporary files would stay open)."""
    out = []
    try:
        for f in uploads(form, "pieces_jointes"):
            data = await f.read()
            out.append(
                Attachment(
                    name=f.filename or "piece-jointe",
                    content_type=f.content_type or "application/octet-stream",
                    data=data,
                )
            )
    finally:
        await form.close()
    return out


async def post_reply(request: Request) -> Response:
    w, session, target = await mailbox_of(request)
    conv_id = _id(request, "conversation")
    settings = w.settings
    form = await read_form(request, session, files=settings.replies.max_attachments + 1)
    body_text = text(form, "message", limit=settings.replies.max_size)
    attachments = await _attachments(form)
    result = await reply(
        w.store,
        patient_id=target,
        conversation_id=conv_id,
        body_text=body_text,
        attachments=attachments,
        author_patient_id=_author(session),
        at=w.clock.now(),
    )
    if not isinstance(result, Refused):
        return redirect(f"/conversations/{conv_id}?info=sent#fin")
    async with w.store.reads() as db:
        detail = await mailbox.conversation(
            db, w.store.keyring, target, conv_id, author_patient_id=_author(session)
        )
    if detail is None:
        raise HTTPException(404)
    errors = Errors()
    errors.add(_FIELD_OF.get(result.reason_code, "message"), result.french_text)
    return await page(
        request,
        "conversation.html",
        {
            "title": render.display_subject(detail.subject),
            "nav": "messages",
            "conv": detail,
            "bodies": await _bodies(w, target, detail),
            "trash": False,
            "errors": errors,
            "body_text": body_text,
        },
        400,
    )


async def _writable(w: Web, target: int) -> list[Any]:
    """Conversations whose professional may receive a new message (DOMAIN.md 4)."""
    async with w.store.reads() as db:
        listing = await mailbox.list_conversations(
            db, w.store.keyring, target, page=1, per_page=500
        )
    return [c for c in listing.items if not c.ended]


async def new_message(request: Request) -> Response:
    w, session, target = await mailbox_of(request)
    errors = Errors()
    values = {"conversation": request.query_params.get("a", ""), "subject": "", "message": ""}
    status = 200
    if request.method == "POST":
        settings = w.settings
        form = await read_form(request, session, files=settings.replies.max_attachments + 1)
        values = {
            "conversation": text(form, "conversation"),
            "subject": text(form, "subject", limit=200),
            "message": text(form, "message", limit=settings.replies.max_size),
        }
        attachments = await _attachments(form)
        if not values["subject"]:
            errors.add("subject", "Indiquez l'objet de votre message.")
        try:
            conv_id = int(values["conversation"])
        except ValueError:
            conv_id = 0
            errors.add("conversation", "Choisissez le professionnel à qui écrire.")
        if not errors:
            result = await reply(
                w.store,
                patient_id=target,
                conversation_id=conv_id,
                body_text=values["message"],
                attachments=attachments,
                author_patient_id=_author(session),
                subject=values["subject"],
                at=w.clock.now(),
            )
            if not isinstance(result, Refused):
                return redirect(f"/conversations/{conv_id}?info=sent#fin")
            field = _FIELD_OF.get(result.reason_code)
            if field is None:
                field = "message" if result.reason_code == "empty" else "conversation"
            errors.add(field, result.french_text)
        status = 400
    return await page(
        request,
        "new.html",
        {
            "title": "Nouveau message",
            "nav": "messages",
            "choices": await _writable(w, target),
            "values": values,
            "errors": errors,
        },
        status,
    )


async def _move(request: Request, *, restore: bool, by: str) -> int:
    """Trash or restore (store/mailbox.py) the conversation or message the path names."""
    w, session, target = await mailbox_of(request)
    item = _id(request, by)
    await read_form(request, session)
    move = mailbox.restore if restore else mailbox.trash
    scope: dict[str, Any] = (
        {"conversation_id": item} if by == "conversation" else {"delivery_ids": [item]}
    )
    changed = await move(
        w.store, target, at=w.clock.now(), author_patient_id=_author(session), **scope
    )
    if not changed:  # nothing of this mailbox: the same answer as a missing id
        raise HTTPException(404)
    return item


async def trash_conversation(request: Request) -> Response:
    await _move(request, restore=False, by="conversation")
    return redirect("/messages?info=trashed")


async def trash_message(request: Request) -> Response:
    await _move(request, restore=False, by="delivery")
    return redirect("/messages?info=message_trashed")


async def restore_conversation(request: Request) -> Response:
    conv_id = await _move(request, restore=True, by="conversation")
    return redirect(f"/conversations/{conv_id}?info=restored")


async def history(request: Request) -> Response:
    w, _session, target = await mailbox_of(request)
    async with w.store.reads() as db:
        entries = await mailbox.history(
            db, w.store.keyring, target, page=_page_number(request), per_page=50
        )
    return await page(
        request,
        "history.html",
        {"title": "Historique d'activité", "nav": "historique", "history": entries},
    )


async def switch_profile(request: Request) -> Response:
    w = web(request)
    session = await logged_in(request)
    assert session.patient_id is not None
    form = await read_form(request, session)
    try:
        wanted = int(text(form, "patient"))
    except ValueError:
        raise HTTPException(404) from None
    if wanted == session.patient_id:
        await sessions.act_for(w, session, None)
        return redirect("/messages?info=profile")
    async with w.store.reads() as db:
        allowed = await mailbox.may_act_for(db, session.patient_id, wanted)
        exists = await db.get(Patient, wanted) if allowed is not None else None
    if allowed is None or exists is None:
        raise HTTPException(404)
    await sessions.act_for(w, session, wanted)
    return redirect("/messages?info=profile")


routes = [
    Route("/", home),
    Route("/messages", conversations),
    Route("/corbeille", trash_list),
    Route("/historique", history),
    Route("/profil", switch_profile, methods=["POST"]),
    Route("/nouveau", new_message, methods=["GET", "POST"]),
    Route("/conversations/{conversation}", show_conversation),
    Route("/conversations/{conversation}/repondre", post_reply, methods=["POST"]),
    Route("/conversations/{conversation}/corbeille", trash_conversation, methods=["POST"]),
    Route("/conversations/{conversation}/restaurer", restore_conversation, methods=["POST"]),
    Route("/messages/{delivery}/corbeille", trash_message, methods=["POST"]),
    Route("/messages/{delivery}/pieces-jointes/{index}", download),
]
