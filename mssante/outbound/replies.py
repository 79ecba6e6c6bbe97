"""A patient's reply to a professional, and the notice when it cannot be delivered.

:func:`reply` is the API the webmail calls (issue 7.2).  It returns a
value (STYLE.md 3): :class:`Sent` or :class:`Refused` with a reason code
and the French sentence to show.  In order, a reply is refused when:

1. the conversation is not in this mailbox, or the author (a helper or a
   legal representative writing for the patient) has no link to it: one
   answer, ``not_found``, so ids cannot be probed;
2. the author's profile is not activated or the mailbox is closed;
3. the professional ended the exchange (DOMAIN.md 4, ``[FIN]`` or
   ``X-MSS-MES: FIN``): "<nom> a mis fin à vos échanges.";
4. the professional never wrote in this conversation;
5. the recipient is neither the conversation's professional nor an
   authorised Reply-To contact that a message of the conversation named;
6. the message is empty, has too many attachments, an attachment whose
   name and content do not agree on an allowed type (attachments.py), or
   is over ``replies.max_size`` (text and attachments).

Without ``to``, the reply goes to the Reply-To of the message it answers
when that address is an authorised contact (DOMAIN.md 4), else to the
professional.

**The message** (email.message, SMTP policy, CRLF): From
``<INS>@<patient domain>`` with the patient's name, To the recipient,
Subject ``Re: <subject of the message answered>`` (the ``XDM/1.0/DDM+``
prefix dropped: the reply carries no XDM archive, DOMAIN.md 5), a new
Message-ID on the patient domain, In-Reply-To the last message of the
conversation from its professional and References as RFC 5322 3.6.4
says, Date from the clock.  No ``X-MSS-*`` header: a patient cannot end
an exchange and sends no structured document.  A reply written by a
helper or representative ends with "Ce message a été rédigé par X,
l'aidant de Y." (or "représentant légal de Y").

**One transaction** (the single writer): the queued message
(``store.outbound``, kind ``reply``), a copy in the patient's mailbox and
the ``reply.queued`` audit event (ids and sizes, no content).  The checks
run first on a read session, the bytes are written as blobs outside any
transaction, then the writer job checks again: if anything the bytes
depend on changed meanwhile (a ``[FIN]`` or a new message arrived), the
blobs are dropped and the reply is refused or built again.

**The copy in the mailbox** is a ``messages`` row with its own blob and a
``deliveries`` row in the conversation, encrypted like received mail
(message key wrapped under the patient's data key), already read.  The
column ``messages.origin`` says who wrote a message: ``received``,
``patient`` (a reply; envelope sender the mailbox) or ``notice`` (the
service; null sender); :func:`origin` reads it.

**Non-delivery** (:func:`record_non_delivery`, the outbound worker's
``on_failure``): in the worker's transaction, a "Message non distribué"
notice is added to the conversation as a message from the service
(``mailer-daemon@<patient domain>``, display name ``notify.from_name``,
null envelope sender), unread, saying in plain French to whom the reply
could not be delivered and why, never the remote server's text; and a
``reply.undelivered`` audit event.  Other kinds (MDN, DSN) get only the
``<kind>.undelivered`` event.
"""

from __future__ import annotations

import asyncio
import enum
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from sqlalchemy import and_, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from mssante.outbound.attachments import Attachment, FileType, check
from mssante.store import audit
from mssante.store.blobs import BlobStore
from mssante.store.conversations import open_conversation
from mssante.store.crypto import seal
from mssante.store.inbox import IncomingMessage, sealed_metadata
from mssante.store.keys import (
    KeyDestroyedError,
    Keyring,
    message_key_context,
    message_meta_context,
    seal_json,
)
from mssante.store.mime import summarize_bytes
from mssante.store.models import (
    Contact,
    Conversation,
    Delivery,
    LinkRole,
    Message,
    MessageOrigin,
    OutboundKind,
    OutboundMessage,
    OutboundRecipient,
    Patient,
    PatientLink,
    ProfileStatus,
)
from mssante.store.reading import message_key, view

if TYPE_CHECKING:
    from mssante.app import Store

__all__ = [
    "Attachment",
    "Origin",
    "RefusalReason",
    "Refused",
    "ReplyResult",
    "Sent",
    "non_delivery_recorder",
    "origin",
    "record_non_delivery",
    "reply",
]

PARIS = ZoneInfo("Europe/Paris")
SERVICE_LOCAL_PART = "mailer-daemon"
SERVICE_ACTOR = "outbound"
XDM_PREFIX = "XDM/1.0/DDM+"
NOTICE_SUBJECT = "Message non distribué"
_ATTEMPTS = 3


class RefusalReason(enum.StrEnum):
    NOT_FOUND = "not_found"
    INACTIVE = "inactive"
    ENDED = "ended"
    NEVER_WROTE = "never_wrote"
    RECIPIENT = "recipient_not_allowed"
    EMPTY = "empty"
    ATTACHMENT_TYPE = "attachment_type"
    TOO_MANY = "too_many_attachments"
    TOO_LARGE = "too_large"


# What the patient reads for each refusal (STYLE.md 4: texts are data).
REFUSALS: dict[RefusalReason, str] = {
    RefusalReason.NOT_FOUND: "Cette conversation est introuvable.",
    RefusalReason.INACTIVE: "Ce profil ne permet pas d'envoyer de message.",
    RefusalReason.ENDED: "{name} a mis fin à vos échanges.",
    RefusalReason.NEVER_WROTE: (
        "Vous ne pouvez écrire qu'à un professionnel qui vous a déjà écrit."
    ),
    RefusalReason.RECIPIENT: (
        "Ce destinataire n'est pas autorisé : vous pouvez écrire au professionnel de cette"
        " conversation ou à l'adresse de réponse qu'il vous a indiquée."
    ),
    RefusalReason.EMPTY: "Votre message est vide.",
    RefusalReason.ATTACHMENT_TYPE: (
        "La pièce jointe « {file} » n'est pas acceptée : seuls les fichiers PDF, texte (.txt),"
        " RTF, Word (.doc), JPEG, PNG et TIFF le sont, et leur contenu doit correspondre"
        " à leur extension."
    ),
    RefusalReason.TOO_MANY: "Un message peut comporter au plus {count} pièces jointes.",
    RefusalReason.TOO_LARGE: (
        "Votre message dépasse la taille autorisée ({size} Mo, pièces jointes comprises)."
    ),
}


@dataclass(frozen=True, slots=True)
class Sent:
    outbound_id: int  # outbound_messages.id
    message_id: str  # the Message-ID header, <...>
    ref: str  # the copy in the patient's mailbox (messages.ref, for reading.read_view)


@dataclass(frozen=True, slots=True)
class Refused:
    reason_code: RefusalReason
    french_text: str


ReplyResult = Sent | Refused


def _refused(reason: RefusalReason, **values: object) -> Refused:
    return Refused(reason, REFUSALS[reason].format(**values))


Origin = MessageOrigin


def origin(message: Message) -> Origin:
    """Who wrote a stored message (``messages.origin``)."""
    return message.origin


def patient_address(ins: str, domain: str) -> str:
    return f"{ins}@{domain}"


def _person_name(patient: Patient) -> str | None:
    name = " ".join(p for p in (patient.given_name, patient.family_name) if p)
    return name or None


# --- deciding -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Plan:
    """Everything the reply's bytes depend on, decided from the database."""

    patient_id: int
    conversation_id: int
    author_id: int
    from_address: str
    from_name: str | None
    signature: str | None
    to: str
    subject: str
    in_reply_to: str | None
    references: tuple[str, ...]


def reply_subject(subject: str | None) -> str:
    text = " ".join((subject or "").split())
    if text.startswith(XDM_PREFIX):
        # DOMAIN.md 5: a document mail's prefix; the reply is not one.
        text = text[len(XDM_PREFIX) :].strip()
    if text[:3].lower() == "re:":
        return text
    return f"Re: {text}".rstrip()


def thread_ids(parent: Message) -> tuple[str | None, tuple[str, ...]]:
    """In-Reply-To and References answering ``parent`` (RFC 5322 3.6.4)."""
    if not parent.message_id:
        return None, ()
    refs = (parent.references or "").split()
    if not refs:
        in_reply_to = (parent.in_reply_to or "").split()
        refs = in_reply_to if len(in_reply_to) == 1 else []
    return parent.message_id, (*refs, parent.message_id)


async def _plan(
    session: AsyncSession,
    keyring: Keyring,
    *,
    patient_domain: str,
    patient_id: int,
    conversation_id: int,
    author_patient_id: int | None,
    to: str | None,
) -> _Plan | Refused:
    mailbox = await session.get(Patient, patient_id)
    conv = await session.get(Conversation, conversation_id)
    if mailbox is None or conv is None or conv.patient_id != patient_id:
        return _refused(RefusalReason.NOT_FOUND)
    author, role = mailbox, None
    if author_patient_id is not None and author_patient_id != patient_id:
        link = await session.scalar(
            select(PatientLink).where(
                PatientLink.patient_id == patient_id, PatientLink.adult_id == author_patient_id
            )
        )
        found = await session.get(Patient, author_patient_id) if link is not None else None
        if link is None or found is None:
            return _refused(RefusalReason.NOT_FOUND)  # no link: as if it did not exist
        author, role = found, link.role
    if author.status is not ProfileStatus.ACTIVATED or not mailbox.status.accepts_mail:
        return _refused(RefusalReason.INACTIVE)
    try:
        dek = await keyring.data_key(session, patient_id)
    except KeyDestroyedError:
        return _refused(RefusalReason.NOT_FOUND)
    names = open_conversation(dek, conv)
    if conv.ended_at is not None:
        return _refused(RefusalReason.ENDED, name=names["name"] or "Le professionnel")
    parent = await session.scalar(
        select(Message)
        .join(Delivery, Delivery.message_id == Message.id)
        .where(
            Delivery.patient_id == patient_id,
            Delivery.conversation_id == conversation_id,
            # Who the message is from, as inbox.py decided the conversation's
            # professional: From, else the envelope sender.
            or_(
                Message.from_address == conv.professional,
                and_(
                    Message.from_address.is_(None),
                    func.lower(Message.mail_from) == conv.professional,
                ),
            ),
            Message.origin == MessageOrigin.RECEIVED,  # received, not written here
        )
        .order_by(Delivery.delivered_at.desc(), Delivery.id.desc())
        .limit(1)
    )
    if parent is None:
        return _refused(RefusalReason.NEVER_WROTE)
    # DOMAIN.md 4: a Reply-To MSSanté address becomes an authorised contact;
    # only those named by a message of this conversation are offered here.
    reply_tos = select(Message.reply_to).join(Delivery, Delivery.message_id == Message.id)
    reply_tos = reply_tos.where(
        Delivery.patient_id == patient_id,
        Delivery.conversation_id == conversation_id,
        Message.reply_to.is_not(None),
    )
    contacts = set(
        await session.scalars(
            select(Contact.address).where(
                Contact.patient_id == patient_id, Contact.address.in_(reply_tos)
            )
        )
    )
    if to is None:
        recipient = parent.reply_to if parent.reply_to in contacts else conv.professional
    else:
        recipient = to.strip().lower()
        if recipient != conv.professional and recipient not in contacts:
            return _refused(RefusalReason.RECIPIENT)
    if recipient is None or recipient.rpartition("@")[2] == patient_domain:
        return _refused(RefusalReason.RECIPIENT)  # never to a patient mailbox
    subject = view(parent, await message_key(session, keyring, parent, patient_id)).subject
    in_reply_to, references = thread_ids(parent)
    signature = None
    if author is not mailbox:
        what = "l'aidant" if role is LinkRole.HELPER else "représentant légal"
        signature = (
            f"Ce message a été rédigé par {_person_name(author) or 'un proche'}, "
            f"{what} de {_person_name(mailbox) or 'ce patient'}."
        )
    return _Plan(
        patient_id=patient_id,
        conversation_id=conversation_id,
        author_id=author.id,
        from_address=patient_address(mailbox.ins, patient_domain),
        from_name=_person_name(mailbox),
        signature=signature,
        to=recipient,
        subject=reply_subject(subject if subject is not None else names["subject"]),
        in_reply_to=in_reply_to,
        references=references,
    )


def _check_content(
    body_text: str, attachments: list[Attachment], *, max_size: int, max_attachments: int
) -> list[tuple[Attachment, FileType]] | Refused:
    if not body_text.strip() and not attachments:
        return _refused(RefusalReason.EMPTY)
    if len(attachments) > max_attachments:
        return _refused(RefusalReason.TOO_MANY, count=max_attachments)
    files = []
    for attachment in attachments:
        kind = check(attachment)
        if kind is None:
            return _refused(RefusalReason.ATTACHMENT_TYPE, file=attachment.name[:80])
        files.append((attachment, kind))
    total = len(body_text.encode("utf-8", "surrogatepass")) + sum(len(a.data) for a in attachments)
    if total > max_size:
        return _refused(RefusalReason.TOO_LARGE, size=f"{max_size / 1_000_000:g}")
    return files


# --- writing --------------------------------------------------------------------------


def new_message_id(domain: str) -> str:
    return f"<{secrets.token_hex(16)}@{domain}>"


def _compose(
    plan: _Plan,
    body_text: str,
    files: list[tuple[Attachment, FileType]],
    *,
    message_id: str,
    at: datetime,
) -> bytes:
    msg = EmailMessage(policy=SMTP)
    local, _, domain = plan.from_address.partition("@")
    msg["From"] = Address(plan.from_name or "", local, domain)
    to_local, _, to_domain = plan.to.partition("@")
    msg["To"] = Address("", to_local, to_domain)
    msg["Subject"] = plan.subject
    msg["Date"] = format_datetime(at)
    msg["Message-ID"] = message_id
    if plan.in_reply_to:
        msg["In-Reply-To"] = plan.in_reply_to
        msg["References"] = " ".join(plan.references)
    text = body_text.replace("\r\n", "\n").rstrip()
    if plan.signature:
        text = f"{text}\n\n{plan.signature}" if text else plan.signature
    msg.set_content(text + "\n", charset="utf-8")
    for attachment, kind in files:
        # Text was checked to be UTF-8 (attachments.sniff): say so.
        params = {"charset": "utf-8"} if kind is FileType.TXT else None
        msg.add_attachment(
            attachment.data,
            maintype=kind.maintype,
            subtype=kind.subtype,
            filename=attachment.name,
            params=params,
        )
    return msg.as_bytes()


@dataclass(frozen=True, slots=True)
class _Blob:
    key: str
    message_key: bytes
    sha256: str


def _write_blob(blobs: BlobStore, data: bytes) -> _Blob:
    spool = blobs.new_spool()
    try:
        spool.write(data)
        sha256 = spool.sha256
        key = blobs.commit(spool)
    except BaseException:
        spool.discard()
        raise
    return _Blob(key, spool.key, sha256)


async def _insert_in_mailbox(
    session: AsyncSession,
    *,
    raw: bytes,
    blob: _Blob,
    ref: str,
    mail_from: str,
    patient_id: int,
    conversation_id: int,
    rcpt: str,
    dek: bytes,
    at: datetime,
    read: bool,
) -> int:
    """A message we wrote, put in a patient's conversation like received mail; its id."""
    summary = summarize_bytes(raw)
    incoming = IncomingMessage(
        ref=ref,
        received_at=at,
        blob_key=blob.key,
        message_key=blob.message_key,
        size=len(raw),
        sha256=blob.sha256,
        trace_header=b"",  # nothing was received
        mail_from=mail_from,
        helo=None,
        peer=None,
        summary=summary,
    )
    conn = await session.connection()
    result = await conn.execute(
        insert(Message).returning(Message.id),
        {
            "ref": ref,
            "received_at": at,
            "blob_key": blob.key,
            "size": len(raw),
            "trace_header": b"",
            "origin": MessageOrigin.NOTICE if mail_from == "" else MessageOrigin.PATIENT,
            "mail_from": mail_from,
            "helo": None,
            "peer": None,
            "from_address": summary.from_address,
            "message_id": summary.message_id,
            "in_reply_to": " ".join(summary.in_reply_to) or None,
            "references": " ".join(summary.references) or None,
            "reply_to": None,
            "disposition_notification_to": None,
            "attachment_count": len(summary.attachments),
            "broken_mime": summary.broken,
            "sealed": seal_json(
                blob.message_key, sealed_metadata(incoming), message_meta_context(ref)
            ),
        },
    )
    message_id: int = result.scalar_one()
    await conn.execute(
        insert(Delivery),
        {
            "message_id": message_id,
            "patient_id": patient_id,
            "conversation_id": conversation_id,
            "rcpt": rcpt,
            "wrapped_key": seal(dek, blob.message_key, message_key_context(ref, patient_id)),
            "ends_conversation": False,
            "delivered_at": at,
            "read_at": at if read else None,
            "trashed_at": None,
        },
    )
    await conn.execute(
        update(Conversation)
        .where(Conversation.id == conversation_id, Conversation.last_message_at < at)
        .values(last_message_at=at)
    )
    return message_id


async def _discard(blobs: BlobStore, *keys: str) -> None:
    for key in keys:
        await asyncio.to_thread(blobs.delete, key)


class _Stale:
    """The conversation changed between the checks and the transaction."""


async def _queue(
    store: Store,
    plan: _Plan,
    decide: Callable[[AsyncSession], Awaitable[_Plan | Refused]],
    body_text: str,
    files: list[tuple[Attachment, FileType]],
    *,
    at: datetime,
) -> Sent | Refused | _Stale:
    """Write the blobs, then queue and store in one writer transaction if ``plan`` still holds."""
    domain = store.settings.smtp.patient_domain
    message_id = new_message_id(domain)
    raw = _compose(plan, body_text, files, message_id=message_id, at=at)
    prepared = await store.outbound.prepare(raw)
    copy = await asyncio.to_thread(_write_blob, store.blobs, raw)
    ref = secrets.token_hex(10)

    async def job(session: AsyncSession) -> Sent | Refused | _Stale:
        current = await decide(session)
        if isinstance(current, Refused):
            return current
        if current != plan:
            return _Stale()
        outbound_id = await store.outbound.add(
            session,
            prepared,
            kind=OutboundKind.REPLY,
            mail_from=plan.from_address,
            recipients=[plan.to],
            at=at,
            message_id=message_id,
            patient_id=plan.patient_id,
            conversation_id=plan.conversation_id,
        )
        stored = await _insert_in_mailbox(
            session,
            raw=raw,
            blob=copy,
            ref=ref,
            mail_from=plan.from_address,
            patient_id=plan.patient_id,
            conversation_id=plan.conversation_id,
            rcpt=plan.from_address,
            dek=await store.keyring.data_key(session, plan.patient_id),
            at=at,
            read=True,
        )
        await audit.append(
            session,
            at=at,
            kind="reply.queued",
            actor=f"patient:{plan.author_id}",
            patient_id=plan.patient_id,
            message_id=stored,
            details={
                "ref": ref,
                "outbound": outbound_id,
                "conversation": plan.conversation_id,
                "author": plan.author_id,
                "size": len(raw),
                "attachments": len(files),
            },
        )
        return Sent(outbound_id, message_id, ref)

    try:
        result = await store.writer.run(job)
    except Exception:
        # Rolled back: no row names these blobs.
        await _discard(store.blobs, prepared.blob_key, copy.key)
        raise
    if not isinstance(result, Sent):
        await _discard(store.blobs, prepared.blob_key, copy.key)
    return result


async def reply(
    store: Store,
    *,
    patient_id: int,
    conversation_id: int,
    body_text: str,
    attachments: list[Attachment],
    author_patient_id: int | None = None,
    to: str | None = None,
    subject: str | None = None,
    at: datetime,
) -> ReplyResult:
    """Queue the patient's reply in conversation ``conversation_id``, or say why not.

    With ``subject``, a *new message* (MES NEW_MESSAGE) to the same
    professional, under the same rules: its own subject and no
    In-Reply-To/References, so the professional's software starts a new thread.
    """
    settings = store.settings
    domain = settings.smtp.patient_domain
    new_subject = " ".join((subject or "").split())[:200]

    async def decide(session: AsyncSession) -> _Plan | Refused:
        plan = await _plan(
            session,
            store.keyring,
            patient_domain=domain,
            patient_id=patient_id,
            conversation_id=conversation_id,
            author_patient_id=author_patient_id,
            to=to,
        )
        if new_subject and isinstance(plan, _Plan):
            plan = replace(plan, subject=new_subject, in_reply_to=None, references=())
        return plan

    for _ in range(_ATTEMPTS):
        async with store.reads() as session:
            plan = await decide(session)
        if isinstance(plan, Refused):
            return plan
        files = _check_content(
            body_text,
            attachments,
            max_size=settings.replies.max_size,
            max_attachments=settings.replies.max_attachments,
        )
        if isinstance(files, Refused):
            return files
        result = await _queue(store, plan, decide, body_text, files, at=at)
        if not isinstance(result, _Stale):
            return result
    raise RuntimeError(f"conversation {conversation_id} kept changing; reply not queued")


# --- non-delivery ---------------------------------------------------------------------

_ENHANCED = re.compile(r"\b[45]\.(\d{1,3})\.(\d{1,3})\b")
_BASIC = re.compile(r"^\s*([45])\d\d\b")

# Why, in words a patient understands (the remote text never reaches them).
CAUSES: dict[str, str] = {
    "expired": "la messagerie de ce professionnel n'a pas pu être jointe pendant plusieurs jours.",
    "not_trusted": "son adresse n'appartient pas à l'espace de confiance MSSanté.",
    "unknown_address": "l'adresse de ce professionnel n'existe pas ou plus.",
    "mailbox_closed": "la messagerie de ce professionnel est fermée.",
    "mailbox_full": "la messagerie de ce professionnel est pleine.",
    "too_large": "le message est trop volumineux pour la messagerie de ce professionnel.",
    "unreachable": "la messagerie de ce professionnel n'a pas pu être jointe.",
    "refused": "la messagerie de ce professionnel a refusé le message.",
}


def explain(reason: str, recipient: OutboundRecipient, at: datetime) -> str:
    """A cause code (a key of CAUSES) for the worker's ``reason`` (its last error)."""
    lowered = reason.lower()
    if reason == "expired" or at >= recipient.expires_at:
        return "expired"
    if "whitelist" in lowered:
        return "not_trusted"
    if m := _ENHANCED.search(reason):
        subject, detail = int(m.group(1)), int(m.group(2))
        if subject == 1 and detail in (1, 2, 3, 6, 10):
            return "unknown_address"
        if (subject, detail) == (2, 1):
            return "mailbox_closed"
        if (subject, detail) == (2, 2):
            return "mailbox_full"
        if (subject, detail) in ((2, 3), (3, 4)):
            return "too_large"
        if subject == 4:
            return "unreachable"
        return "refused"
    if _BASIC.match(reason):
        return "refused"
    return "unreachable"  # no reply from a server: connection, TLS, DNS, attempts spent


def _compose_notice(
    *,
    service: str,
    service_name: str,
    to: str,
    professional: str,
    sent_at: datetime,
    cause: str,
    original_id: str | None,
    message_id: str,
    at: datetime,
) -> bytes:
    msg = EmailMessage(policy=SMTP)
    local, _, domain = service.partition("@")
    msg["From"] = Address(service_name, local, domain)
    to_local, _, to_domain = to.partition("@")
    msg["To"] = Address("", to_local, to_domain)
    msg["Subject"] = NOTICE_SUBJECT
    msg["Date"] = format_datetime(at)
    msg["Message-ID"] = message_id
    if original_id:
        msg["In-Reply-To"] = original_id
        msg["References"] = original_id
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834
    when = sent_at.astimezone(PARIS).strftime("%d/%m/%Y à %H:%M")
    msg.set_content(
        f"Votre message à {professional}, envoyé le {when}, n'a pas pu être distribué : "
        f"{CAUSES[cause]}\n\n"
        "Il ne lui a pas été remis. Vous pouvez réessayer plus tard, ou contacter ce"
        " professionnel par un autre moyen.\n",
        charset="utf-8",
    )
    return msg.as_bytes()


async def record_non_delivery(
    session: AsyncSession,
    message: OutboundMessage,
    recipient: OutboundRecipient,
    reason: str,
    at: datetime,
    *,
    store: Store,
) -> None:
    """The worker's ``on_failure``: see the module docstring (bind ``store`` with
    :func:`non_delivery_recorder`)."""
    cause = explain(reason, recipient, at)
    details: dict[str, Any] = {
        "outbound": message.id,
        "recipient": recipient.id,
        "domain": recipient.domain,
        "cause": cause,
    }
    kind = f"{message.kind.value}.undelivered"
    notice = await _add_notice(session, message, recipient, cause, at, store=store)
    if notice is not None:
        details["notice"] = notice[1]
    elif message.kind is OutboundKind.REPLY:
        details["notice"] = None  # erased mailbox or conversation gone: nothing to show
    await audit.append(
        session,
        at=at,
        kind=kind,
        actor=SERVICE_ACTOR,
        patient_id=message.patient_id,
        message_id=notice[0] if notice is not None else None,
        details=details,
    )


async def _add_notice(
    session: AsyncSession,
    message: OutboundMessage,
    recipient: OutboundRecipient,
    cause: str,
    at: datetime,
    *,
    store: Store,
) -> tuple[int, str] | None:
    """The notice in the reply's conversation: (message id, ref), or None."""
    if message.kind is not OutboundKind.REPLY:
        return None
    if message.patient_id is None or message.conversation_id is None:
        return None
    conv = await session.get(Conversation, message.conversation_id)
    patient = await session.get(Patient, message.patient_id)
    if conv is None or patient is None or conv.patient_id != patient.id:
        return None
    # One notice per failed recipient, even if the worker records twice.
    ref = f"nd-{message.ref}-{recipient.id}"
    known = await session.scalar(select(Message.id).where(Message.ref == ref))
    if known is not None:
        return known, ref
    try:
        dek = await store.keyring.data_key(session, patient.id)
    except KeyDestroyedError:
        return None
    settings = store.settings
    domain = settings.smtp.patient_domain
    mailbox = patient_address(patient.ins, domain)
    raw = _compose_notice(
        service=f"{SERVICE_LOCAL_PART}@{domain}",
        service_name=settings.notify.from_name,
        to=mailbox,
        professional=open_conversation(dek, conv)["name"] or "ce professionnel",
        sent_at=message.created_at,
        cause=cause,
        original_id=message.message_id,
        message_id=new_message_id(domain),
        at=at,
    )
    # A small blob written inside the worker's transaction: if it rolls
    # back, the file is an orphan that `mssante store check` lists.
    blob = await asyncio.to_thread(_write_blob, store.blobs, raw)
    notice_id = await _insert_in_mailbox(
        session,
        raw=raw,
        blob=blob,
        ref=ref,
        mail_from="",
        patient_id=patient.id,
        conversation_id=conv.id,
        rcpt=mailbox,
        dek=dek,
        at=at,
        read=False,
    )
    return notice_id, ref


FailureCallback = Callable[
    [AsyncSession, OutboundMessage, OutboundRecipient, str, datetime], Awaitable[None]
]


def non_delivery_recorder(store: Store) -> FailureCallback:
    """``record_non_delivery`` bound to ``store``, for ``OutboundWorker(on_failure=[...])``."""

    async def on_failure(
        session: AsyncSession,
        message: OutboundMessage,
        recipient: OutboundRecipient,
        reason: str,
        at: datetime,
    ) -> None:
        await record_non_delivery(session, message, recipient, reason, at, store=store)

    return on_failure
