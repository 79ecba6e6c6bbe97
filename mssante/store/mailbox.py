"""What the webmail pages read and change in a patient's mailbox (issue 8).

The web layer only renders what these functions return: frozen values,
never ORM rows (except :func:`message_for_download`, whose row the caller
needs to read the blob).  Every query is bounded by the patient whose
mailbox is open, so an id from another mailbox is simply not found: the
caller answers 404 for "does not exist" and "not yours" alike.

DOMAIN.md 4: the patient never sees a professional's address, only the
name; where no name is known (or the "name" is itself an address) a neutral
wording stands in (:data:`PROFESSIONAL`).  The activity history
(DOMAIN.md 3, "everything done on a profile is traced and visible to the
patient") is written from the audit trail in plain French, with names at
most: never a subject, a body, an INS or an address.

Listing a mailbox of ten thousand messages costs a fixed number of
queries: one aggregate over the patient's deliveries (index
``ix_deliveries_patient_conversation``) joined to the conversations, paged
in SQL, one count, and only the page's names are decrypted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import case, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from mssante.outbound.replies import REFUSALS, RefusalReason
from mssante.store import audit
from mssante.store.conversations import open_sealed
from mssante.store.crypto import unseal
from mssante.store.keys import KeyDestroyedError, Keyring, message_key_context
from mssante.store.models import (
    AuditEvent,
    Conversation,
    Delivery,
    LinkRole,
    Message,
    MessageOrigin,
    Patient,
    PatientLink,
    ProfileStatus,
)
from mssante.store.reading import AttachmentView, view

if TYPE_CHECKING:
    from mssante.app import Store

__all__ = [
    "PROFESSIONAL",
    "AttachmentView",
    "ConversationDetail",
    "ConversationPage",
    "ConversationSummary",
    "HistoryEntry",
    "HistoryPage",
    "MessageEntry",
    "ProfileChoice",
    "conversation",
    "history",
    "list_conversations",
    "may_act_for",
    "message_for_download",
    "represented",
    "restore",
    "trash",
    "unread_count",
]

# DOMAIN.md 4: what the patient reads where a professional's name is unknown.
PROFESSIONAL = "Professionnel de santé"
SERVICE = "Service de messagerie"  # a notice without a display name
YOU = "Vous"  # a reply whose From carried no name
# replies.py's own stand-in in "<nom> a mis fin à vos échanges."
ENDED_BY = "Le professionnel"


# --- values ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConversationSummary:
    id: int
    professional_name: str
    subject: str | None  # the first subject, raw (the web layer hides prefixes)
    last_message_at: datetime  # of the deliveries listed (not trashed / trashed)
    messages: int
    unread: int
    has_attachments: bool
    ended: bool
    ended_by_name: str | None  # None unless ended


@dataclass(frozen=True, slots=True)
class ConversationPage:
    items: list[ConversationSummary]
    total: int  # conversations in this view, all pages
    page: int
    pages: int


@dataclass(frozen=True, slots=True)
class MessageEntry:
    delivery_id: int
    ref: str
    origin: MessageOrigin
    received_at: datetime
    from_name: str
    subject: str | None
    read: bool
    attachments: list[AttachmentView]
    size: int
    ends_conversation: bool


@dataclass(frozen=True, slots=True)
class ConversationDetail:
    id: int
    professional_name: str
    subject: str | None
    ended: bool
    ended_by_name: str | None
    messages: list[MessageEntry]  # received order
    can_reply: bool
    reply_blocked: RefusalReason | None  # why not, as outbound/replies.py would say
    reply_blocked_reason: str | None  # its French text (replies.REFUSALS)


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    at: datetime
    kind: str
    text: str


@dataclass(frozen=True, slots=True)
class HistoryPage:
    items: list[HistoryEntry]
    total: int
    page: int
    pages: int


@dataclass(frozen=True, slots=True)
class ProfileChoice:
    patient_id: int
    name: str
    role: LinkRole
    status: ProfileStatus


# --- helpers --------------------------------------------------------------------------


def _pages(total: int, per_page: int) -> int:
    return max(1, -(-total // per_page))


def _paging(page: int, per_page: int) -> tuple[int, int]:
    if per_page < 1:
        raise ValueError("per_page must be at least 1")
    page = max(1, page)
    return page, (page - 1) * per_page


def _fit(name: str | None) -> str | None:
    """A display name fit to show, or None: never an address (DOMAIN.md 4)."""
    name = " ".join((name or "").split())
    if not name or "@" in name:
        return None
    return name


def _shown(name: str | None, fallback: str = PROFESSIONAL) -> str:
    return _fit(name) or fallback


def _person_name(given_name: str | None, family_name: str | None) -> str | None:
    name = " ".join(p for p in (given_name, family_name) if p)
    return name or None


async def _data_key(session: AsyncSession, keyring: Keyring, patient_id: int) -> bytes | None:
    try:
        return await keyring.data_key(session, patient_id)
    except KeyDestroyedError:  # erased profile: nothing left to read
        return None


def _conversation_names(dek: bytes | None, patient_id: int, sealed: bytes) -> dict[str, Any]:
    if dek is None:
        return {"name": None, "subject": None}
    return open_sealed(dek, patient_id, sealed)


def _sender_name(dek: bytes, patient_id: int, message: Message, wrapped_key: bytes) -> str | None:
    key = unseal(dek, wrapped_key, message_key_context(message.ref, patient_id))
    return view(message, key).from_name


async def _ender_names(
    session: AsyncSession, dek: bytes | None, patient_id: int, conversation_ids: list[int]
) -> dict[int, str | None]:
    """Who ended each conversation, for those ended by someone other than its
    professional (a message that joined by In-Reply-To): the display name of
    the latest message that ended it.  One query for them all."""
    if dek is None or not conversation_ids:
        return {}
    rows = await session.execute(
        select(Delivery.conversation_id, Delivery.wrapped_key, Message)
        .join(Message, Message.id == Delivery.message_id)
        .where(
            Delivery.patient_id == patient_id,
            Delivery.conversation_id.in_(conversation_ids),
            Delivery.ends_conversation.is_(True),
        )
        .order_by(Delivery.conversation_id, Delivery.delivered_at, Delivery.id)
    )
    names: dict[int, str | None] = {}
    for conversation_id, wrapped_key, message in rows:
        names[conversation_id] = _sender_name(dek, patient_id, message, wrapped_key)
    return names


def _ended_by_name(
    ended_at: datetime | None,
    ended_by: str | None,
    professional: str,
    professional_name: str,
    enders: dict[int, str | None],
    conversation_id: int,
) -> str | None:
    if ended_at is None:
        return None
    if ended_by is None or ended_by == professional:
        return professional_name
    return _shown(enders.get(conversation_id))


def _trash_state(trash: bool) -> Any:
    return Delivery.trashed_at.is_not(None) if trash else Delivery.trashed_at.is_(None)


# --- the conversation list ------------------------------------------------------------


async def list_conversations(
    session: AsyncSession,
    keyring: Keyring,
    patient_id: int,
    *,
    page: int,
    per_page: int,
    trash: bool = False,
) -> ConversationPage:
    """One page of the patient's conversations having a delivery in the view
    (in the mailbox, or with ``trash`` in the trash): unread first, then the
    latest first."""
    page, offset = _paging(page, per_page)
    state = _trash_state(trash)
    unread = func.sum(case((Delivery.read_at.is_(None), 1), else_=0))
    counts = (
        select(
            Delivery.conversation_id.label("conversation_id"),
            func.count().label("messages"),
            unread.label("unread"),
            func.max(Delivery.delivered_at).label("last_at"),
        )
        # Only deliveries columns: the covering index ix_deliveries_mailbox answers it.
        .where(Delivery.patient_id == patient_id, state)
        .group_by(Delivery.conversation_id)
        .subquery()
    )
    rows = (
        await session.execute(
            select(
                Conversation.id,
                Conversation.professional,
                Conversation.sealed,
                Conversation.ended_at,
                Conversation.ended_by,
                counts.c.messages,
                counts.c.unread,
                counts.c.last_at,
            )
            .join(counts, counts.c.conversation_id == Conversation.id)
            .where(Conversation.patient_id == patient_id)
            .order_by(
                case((counts.c.unread > 0, 0), else_=1),
                counts.c.last_at.desc(),
                Conversation.id,
            )
            .limit(per_page)
            .offset(offset)
        )
    ).all()
    total = int(
        await session.scalar(
            select(func.count(func.distinct(Delivery.conversation_id))).where(
                Delivery.patient_id == patient_id, state
            )
        )
        or 0
    )
    # The attachment marks of this page only (a join over the whole mailbox costs
    # three quarters of the list: bench/webmail.py).
    with_files: set[int] = set()
    if rows:
        with_files = set(
            await session.scalars(
                select(Delivery.conversation_id)
                .join(Message, Message.id == Delivery.message_id)
                .where(
                    Delivery.patient_id == patient_id,
                    state,
                    Delivery.conversation_id.in_([r.id for r in rows]),
                    Message.attachment_count > 0,
                )
                .distinct()
            )
        )
    dek = await _data_key(session, keyring, patient_id) if rows else None
    enders = await _ender_names(
        session,
        dek,
        patient_id,
        [r.id for r in rows if r.ended_at is not None and r.ended_by not in (None, r.professional)],
    )
    items = []
    for row in rows:
        names = _conversation_names(dek, patient_id, row.sealed)
        name = _shown(names["name"])
        items.append(
            ConversationSummary(
                id=row.id,
                professional_name=name,
                subject=names["subject"],
                last_message_at=row.last_at,
                messages=int(row.messages),
                unread=int(row.unread or 0),
                has_attachments=row.id in with_files,
                ended=row.ended_at is not None,
                ended_by_name=_ended_by_name(
                    row.ended_at, row.ended_by, row.professional, name, enders, row.id
                ),
            )
        )
    return ConversationPage(items, total, page, _pages(total, per_page))


# --- one conversation -----------------------------------------------------------------


def _from_professional(message: Message, professional: str) -> bool:
    # As outbound/replies.py finds the message a reply answers: received
    # (not written here), From the conversation's professional, else the
    # envelope sender when there is no From.
    if message.origin is not MessageOrigin.RECEIVED:
        return False
    if message.from_address is not None:
        return message.from_address == professional
    return message.mail_from.lower() == professional


async def _author_link(
    session: AsyncSession, patient_id: int, author_patient_id: int | None
) -> tuple[Patient, Patient] | None:
    """(mailbox, author), or None when either is unknown or not linked."""
    mailbox = await session.get(Patient, patient_id)
    if mailbox is None:
        return None
    if author_patient_id is None or author_patient_id == patient_id:
        return mailbox, mailbox
    if await may_act_for(session, author_patient_id, patient_id) is None:
        return None
    author = await session.get(Patient, author_patient_id)
    return (mailbox, author) if author is not None else None


async def conversation(
    session: AsyncSession,
    keyring: Keyring,
    patient_id: int,
    conversation_id: int,
    *,
    trash: bool = False,
    author_patient_id: int | None = None,
) -> ConversationDetail | None:
    """The conversation's messages in the view (mailbox, or trash), oldest
    first; None when it is not this patient's.

    ``author_patient_id`` is who would reply (a helper or legal
    representative reading a represented person's mailbox; by default the
    patient): it decides ``can_reply`` as outbound/replies.py does, and
    without a link to the patient the answer is None.
    """
    people = await _author_link(session, patient_id, author_patient_id)
    conv = await session.get(Conversation, conversation_id)
    if people is None or conv is None or conv.patient_id != patient_id:
        return None
    dek = await _data_key(session, keyring, patient_id)
    if dek is None:
        return None
    mailbox, author = people
    rows = (
        await session.execute(
            select(Delivery, Message)
            .join(Message, Message.id == Delivery.message_id)
            .where(Delivery.patient_id == patient_id, Delivery.conversation_id == conv.id)
            .order_by(Message.received_at, Delivery.id)
        )
    ).all()
    names = open_sealed(dek, patient_id, conv.sealed)
    name = _shown(names["name"])
    entries: list[MessageEntry] = []
    ender: dict[int, str | None] = {}
    for delivery, message in rows:
        shown = (delivery.trashed_at is not None) == trash
        if not shown and not delivery.ends_conversation:
            continue
        key = unseal(dek, delivery.wrapped_key, message_key_context(message.ref, patient_id))
        meta = view(message, key)
        if delivery.ends_conversation:
            ender[conv.id] = meta.from_name
        if not shown:
            continue
        if message.origin is MessageOrigin.PATIENT:
            from_name = _shown(meta.from_name, YOU)
        elif message.origin is MessageOrigin.NOTICE:
            from_name = _shown(meta.from_name, SERVICE)
        else:
            from_name = _shown(meta.from_name, name)
        entries.append(
            MessageEntry(
                delivery_id=delivery.id,
                ref=message.ref,
                origin=message.origin,
                received_at=message.received_at,
                from_name=from_name,
                subject=meta.subject,
                read=delivery.read_at is not None,
                attachments=meta.attachments,
                size=message.size,
                ends_conversation=delivery.ends_conversation,
            )
        )
    ended_by_name = _ended_by_name(
        conv.ended_at, conv.ended_by, conv.professional, name, ender, conv.id
    )
    # The order of outbound/replies.py's checks: profile, end, never wrote.
    blocked: RefusalReason | None = None
    reason: str | None = None
    if author.status is not ProfileStatus.ACTIVATED or not mailbox.status.accepts_mail:
        blocked = RefusalReason.INACTIVE
    elif conv.ended_at is not None:
        blocked = RefusalReason.ENDED
        # replies.py names the conversation's professional, whoever ended it.
        reason = REFUSALS[blocked].format(name=_shown(names["name"], ENDED_BY))
    elif not any(_from_professional(m, conv.professional) for _, m in rows):
        blocked = RefusalReason.NEVER_WROTE
    if blocked is not None and reason is None:
        reason = REFUSALS[blocked]
    return ConversationDetail(
        id=conv.id,
        professional_name=name,
        subject=names["subject"],
        ended=conv.ended_at is not None,
        ended_by_name=ended_by_name,
        messages=entries,
        can_reply=blocked is None,
        reply_blocked=blocked,
        reply_blocked_reason=reason,
    )


async def message_for_download(
    session: AsyncSession, keyring: Keyring, patient_id: int, delivery_id: int
) -> tuple[Message, bytes] | None:
    """The message row and its key when ``delivery_id`` is in this patient's
    mailbox (trashed or not); the caller reads ``store.blobs.read(message.blob_key,
    key)`` in a thread."""
    row = (
        await session.execute(
            select(Delivery.wrapped_key, Message)
            .join(Message, Message.id == Delivery.message_id)
            .where(Delivery.id == delivery_id, Delivery.patient_id == patient_id)
        )
    ).one_or_none()
    if row is None:
        return None
    wrapped_key, message = row
    dek = await _data_key(session, keyring, patient_id)
    if dek is None:
        return None
    return message, unseal(dek, wrapped_key, message_key_context(message.ref, patient_id))


async def messages_for_display(
    session: AsyncSession, keyring: Keyring, patient_id: int, delivery_ids: list[int]
) -> dict[int, tuple[str, bytes]]:
    """Blob key and message key of each of ``delivery_ids`` in this patient's
    mailbox, in one query and one data key (a conversation page)."""
    if not delivery_ids:
        return {}
    rows = (
        await session.execute(
            select(Delivery.id, Delivery.wrapped_key, Message.ref, Message.blob_key)
            .join(Message, Message.id == Delivery.message_id)
            .where(Delivery.id.in_(delivery_ids), Delivery.patient_id == patient_id)
        )
    ).all()
    dek = await _data_key(session, keyring, patient_id) if rows else None
    if dek is None:
        return {}
    return {
        r.id: (r.blob_key, unseal(dek, r.wrapped_key, message_key_context(r.ref, patient_id)))
        for r in rows
    }


async def unread_count(session: AsyncSession, patient_id: int) -> int:
    """Unread messages in the mailbox (not in the trash): the badge."""
    n = await session.scalar(
        select(func.count()).where(
            Delivery.patient_id == patient_id,
            Delivery.read_at.is_(None),
            Delivery.trashed_at.is_(None),
        )
    )
    return int(n or 0)


# --- trash ----------------------------------------------------------------------------


async def _move(
    store: Store,
    patient_id: int,
    *,
    to_trash: bool,
    at: datetime,
    delivery_ids: Iterable[int] | None,
    conversation_id: int | None,
    author_patient_id: int | None,
) -> int:
    if delivery_ids is None and conversation_id is None:
        raise ValueError("give delivery_ids, conversation_id or both")
    wanted = sorted(set(delivery_ids)) if delivery_ids is not None else None
    author = author_patient_id if author_patient_id is not None else patient_id
    kind = "mailbox.trashed" if to_trash else "mailbox.restored"

    async def job(session: AsyncSession) -> int:
        query = select(Delivery.id).where(
            Delivery.patient_id == patient_id, _trash_state(not to_trash)
        )
        if wanted is not None:
            query = query.where(Delivery.id.in_(wanted))
        if conversation_id is not None:
            query = query.where(Delivery.conversation_id == conversation_id)
        ids = sorted(await session.scalars(query.order_by(Delivery.id)))
        if not ids:
            return 0
        await session.execute(
            update(Delivery)
            .where(Delivery.id.in_(ids), Delivery.patient_id == patient_id)
            .values(trashed_at=at if to_trash else None)
            .execution_options(synchronize_session=False)
        )
        details: dict[str, Any] = {"count": len(ids), "deliveries": ids, "author": author}
        if conversation_id is not None:
            details["conversation"] = conversation_id
        await audit.append(
            session,
            at=at,
            kind=kind,
            actor=f"patient:{author}",
            patient_id=patient_id,
            details=details,
        )
        return len(ids)

    return await store.writer.run(job)


async def trash(
    store: Store,
    patient_id: int,
    *,
    at: datetime,
    delivery_ids: Iterable[int] | None = None,
    conversation_id: int | None = None,
    author_patient_id: int | None = None,
) -> int:
    """Move this patient's deliveries (those given, those of the conversation,
    or those given within the conversation) to the trash; how many moved.

    One ``mailbox.trashed`` audit event when any moved (actor
    ``patient:<author id>``; ids and count only).  The trash is emptied
    by retention (retention.py, ``trash_days``).
    """
    return await _move(
        store,
        patient_id,
        to_trash=True,
        at=at,
        delivery_ids=delivery_ids,
        conversation_id=conversation_id,
        author_patient_id=author_patient_id,
    )


async def restore(
    store: Store,
    patient_id: int,
    *,
    at: datetime,
    delivery_ids: Iterable[int] | None = None,
    conversation_id: int | None = None,
    author_patient_id: int | None = None,
) -> int:
    """Bring deliveries back from the trash (see :func:`trash`); ``mailbox.restored``."""
    return await _move(
        store,
        patient_id,
        to_trash=False,
        at=at,
        delivery_ids=delivery_ids,
        conversation_id=conversation_id,
        author_patient_id=author_patient_id,
    )


# --- profiles -------------------------------------------------------------------------


async def represented(session: AsyncSession, adult_id: int) -> list[ProfileChoice]:
    """The profiles ``adult_id`` may open besides their own (minors they
    represent, people they help), by name."""
    rows = await session.execute(
        select(
            Patient.id, Patient.given_name, Patient.family_name, Patient.status, PatientLink.role
        )
        .join(PatientLink, PatientLink.patient_id == Patient.id)
        .where(PatientLink.adult_id == adult_id, Patient.id != adult_id)
        .order_by(Patient.given_name, Patient.family_name, Patient.id)
    )
    return [
        ProfileChoice(
            patient_id=row.id,
            name=_person_name(row.given_name, row.family_name) or "Profil sans nom",
            role=row.role,
            status=row.status,
        )
        for row in rows
    ]


async def may_act_for(
    session: AsyncSession, adult_id: int, patient_id: int
) -> LinkRole | Literal["self"] | None:
    """May ``adult_id`` (the logged-in person) open ``patient_id``'s mailbox?
    ``"self"``, the link's role, or None.  To ask on every request."""
    if adult_id == patient_id:
        return "self"
    role: LinkRole | None = await session.scalar(
        select(PatientLink.role).where(
            PatientLink.adult_id == adult_id, PatientLink.patient_id == patient_id
        )
    )
    return role


# --- activity history -----------------------------------------------------------------

# Technical events with nothing for the patient to learn (the operator's
# tools, and what another event already tells: outbound.failed is followed
# by reply.undelivered / mdn.undelivered).
HIDDEN_KINDS = frozenset(
    {
        "keys.rotated",
        "outbound.failed",
        "outbound.retried",
        "outbound.held",
        "outbound.released",
        "outbound.deleted",
        "patients.imported",
        "account.created",
        "account.disabled",
    }
)

_STATUS = {
    ProfileStatus.ACTIVATED.value: "activée",
    ProfileStatus.CREATED.value: "créée, en attente d'activation",
    ProfileStatus.OPPOSED.value: "refusée (opposition)",
    ProfileStatus.CLOSED.value: "fermée",
}
_FIELDS = {
    "status": "statut",
    "activation_email": "adresse e-mail",
    "insurer_email": "adresse e-mail connue de l'Assurance Maladie",
    "given_name": "prénom",
    "family_name": "nom",
    "birth_date": "date de naissance",
    "postal_address": "adresse postale",
}
_CHANNEL = {"email": "par e-mail", "postal": "par courrier"}
_MDN_SKIP = {
    "null_sender": "le message était lui-même un avis automatique",
    "domain_mismatch": "l'adresse demandée n'était pas celle de l'expéditeur",
    "patient_domain": "l'adresse demandée était celle d'une messagerie patient",
}
_REFUSED = {
    "mailbox_closed": "votre messagerie était fermée",
}
GENERIC = "Opération sur votre messagerie"


_SOMEONE = "un professionnel de santé"
_VOWELS = tuple("aeiouyàâäéèêëîïôöùûüœ")


def _de(name: str | None) -> str:
    """French "from": de <nom>, d'<nom> before a vowel, d'un professionnel de santé."""
    name = name or _SOMEONE
    return f"d'{name}" if name.lower().startswith(_VOWELS) else f"de {name}"


def _a(name: str | None) -> str:
    return f"à {name or _SOMEONE}"


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True, slots=True)
class _Context:
    """Names the page's sentences need, loaded with a few queries for the page."""

    patient_id: int
    senders: dict[int, str | None]  # message id -> sender's display name
    conversations: dict[int, str | None]  # conversation id -> professional's name
    message_conversations: dict[int, int]  # message id -> conversation id
    people: dict[int, str | None]  # patient id -> "Prénom Nom"

    def sender(self, event: AuditEvent) -> str | None:
        """The display name of the message's sender, else of its conversation's professional."""
        name = self.senders.get(event.message_id) if event.message_id is not None else None
        return _fit(name) or self.professional(event)

    def professional(self, event: AuditEvent) -> str | None:
        conversation_id = _int(event.details.get("conversation"))
        if conversation_id is None and event.message_id is not None:
            conversation_id = self.message_conversations.get(event.message_id)
        if conversation_id is None:
            return None
        return _fit(self.conversations.get(conversation_id))

    def by(self, event: AuditEvent, key: str = "author") -> str:
        """Who did it (" par <nom>") when it was not the patient: a helper or representative."""
        who = _int(event.details.get(key))
        if who is None or who == self.patient_id:
            return ""
        return f" par {self.person(who)}"

    def person(self, patient_id: int) -> str:
        return self.people.get(patient_id) or "un proche"


async def _context(
    session: AsyncSession, keyring: Keyring, patient_id: int, events: Sequence[AuditEvent]
) -> _Context:
    message_ids = {e.message_id for e in events if e.message_id is not None}
    conversation_ids = {c for e in events if (c := _int(e.details.get("conversation"))) is not None}
    people = {
        p for e in events for k in ("author", "by") if (p := _int(e.details.get(k))) is not None
    }
    senders: dict[int, str | None] = {}
    message_conversations: dict[int, int] = {}
    conversations: dict[int, str | None] = {}
    dek = await _data_key(session, keyring, patient_id) if message_ids or conversation_ids else None
    if dek is not None and message_ids:
        rows = await session.execute(
            select(Delivery.conversation_id, Delivery.wrapped_key, Message)
            .join(Message, Message.id == Delivery.message_id)
            .where(Delivery.patient_id == patient_id, Delivery.message_id.in_(message_ids))
        )
        for conversation_id, wrapped_key, message in rows:
            message_conversations[message.id] = conversation_id
            conversation_ids.add(conversation_id)
            if message.origin is MessageOrigin.RECEIVED:
                senders[message.id] = _sender_name(dek, patient_id, message, wrapped_key)
    if dek is not None and conversation_ids:
        sealed_rows = await session.execute(
            select(Conversation.id, Conversation.sealed).where(
                Conversation.patient_id == patient_id, Conversation.id.in_(conversation_ids)
            )
        )
        for conversation_id, sealed in sealed_rows:
            conversations[conversation_id] = open_sealed(dek, patient_id, sealed)["name"]
    names: dict[int, str | None] = {}
    if people:
        person_rows = await session.execute(
            select(Patient.id, Patient.given_name, Patient.family_name).where(
                Patient.id.in_(people)
            )
        )
        names = {pid: _person_name(given, family) for pid, given, family in person_rows}
    return _Context(patient_id, senders, conversations, message_conversations, names)


def _sentence(event: AuditEvent, ctx: _Context) -> str:
    """The event in plain French: names at most, never content nor addresses."""
    kind, d = event.kind, event.details
    match kind:
        case "message.delivered":
            return f"Message reçu {_de(ctx.sender(event))}"
        case "message.read":
            return f"Lecture d'un message {_de(ctx.sender(event))}"
        case "message.refused":
            why = _REFUSED.get(str(d.get("cause")))
            return "Un message n'a pas pu vous être remis" + (f" : {why}" if why else "")
        case "mdn.queued":
            return f"Accusé de lecture envoyé {_a(ctx.sender(event))}"
        case "mdn.skipped":
            why = _MDN_SKIP.get(str(d.get("why")))
            text = f"Accusé de lecture demandé par {ctx.sender(event) or _SOMEONE} non envoyé"
            return text + (f" : {why}" if why else "")
        case "mdn.undelivered":
            return "Un accusé de lecture n'a pas pu être remis"
        case "reply.queued":
            return f"Réponse envoyée {_a(ctx.professional(event))}{ctx.by(event)}"
        case "reply.undelivered":
            return f"Votre réponse {_a(ctx.professional(event))} n'a pas pu être remise"
        case "outbound.sent":
            if d.get("kind") == "reply":
                return "Réponse remise à la messagerie du professionnel"
            if d.get("kind") == "mdn":
                return "Accusé de lecture remis à la messagerie du professionnel"
            return "Envoi remis à son destinataire"
        case "notification.sent":
            channel = _CHANNEL.get(str(d.get("channel")), "par e-mail")
            return f"Avis de nouveau message envoyé {channel}"
        case "notification.failed":
            return "Un avis de nouveau message par e-mail n'a pas pu être envoyé"
        case "notification.bounced":
            text = "Un avis de nouveau message par e-mail n'a pas été remis"
            if d.get("email_invalid"):
                text += " : votre adresse e-mail est à vérifier"
            return text
        case "notification.postal":
            events = _int(d.get("events"))
            what = f" ({_plural(events, 'événement', 'événements')})" if events else ""
            return f"Relevé d'activité envoyé par courrier{what}"
        case "notification.retried":
            return "Nouvel essai d'envoi d'un avis de nouveau message"
        case "patient.created":
            return "Création de votre profil"
        case "patient.updated":
            fields = [_FIELDS[f] for f in d.get("fields", []) if f in _FIELDS]
            return "Mise à jour de votre profil" + (f" : {', '.join(fields)}" if fields else "")
        case "patient.status_changed":
            status = _STATUS.get(str(d.get("to")))
            return f"Votre messagerie est désormais {status}" if status else GENERIC
        case "patient.erased":
            return "Effacement des données de votre messagerie"
        case "patient.activated":
            return "Activation de votre messagerie"
        case "activation.code_issued":
            way = _CHANNEL.get(str(d.get("channel")))
            return "Code provisoire envoyé" + (f" {way}" if way else "")
        case "mailbox.closed":
            return "Fermeture de votre messagerie"
        case "mailbox.trashed":
            n = _int(d.get("count")) or 0
            return f"{_plural(n, 'message mis', 'messages mis')} à la corbeille{ctx.by(event)}"
        case "mailbox.restored":
            n = _int(d.get("count")) or 0
            moved = _plural(n, "message restauré", "messages restaurés")
            return f"{moved} depuis la corbeille{ctx.by(event)}"
        case "retention.purged":
            return "Suppression définitive des messages de la corbeille"
        case "web.login":
            return "Connexion"
        case "web.login_failed":
            return "Tentative de connexion échouée"
        case "web.logout":
            return "Déconnexion"
        case "web.totp_enabled":
            return "Activation de la validation en deux étapes"
        case "web.totp_disabled":
            return "Désactivation de la validation en deux étapes"
        case "web.password_changed":
            return "Modification de votre mot de passe"
        case "web.helper_access":
            who = _int(d.get("by"))
            return f"Consultation par {ctx.person(who)}" if who is not None else "Consultation"
    return GENERIC


async def history(
    session: AsyncSession, keyring: Keyring, patient_id: int, *, page: int, per_page: int
) -> HistoryPage:
    """The patient's activity history (DOMAIN.md 3), newest first, in French."""
    page, offset = _paging(page, per_page)
    where = (AuditEvent.patient_id == patient_id, AuditEvent.kind.not_in(sorted(HIDDEN_KINDS)))
    query = (
        select(AuditEvent)
        .where(*where)
        .order_by(AuditEvent.occurred_at.desc(), AuditEvent.id.desc())
        .limit(per_page)
        .offset(offset)
    )
    events = list(await session.scalars(query))
    total = int(await session.scalar(select(func.count()).where(*where)) or 0)
    ctx = await _context(session, keyring, patient_id, events)
    items = [HistoryEntry(e.occurred_at, e.kind, _sentence(e, ctx)) for e in events]
    return HistoryPage(items, total, page, _pages(total, per_page))
