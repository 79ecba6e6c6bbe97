"""Threading a patient's messages into conversations (DOMAIN.md 4).

A message joins, in this order:
1. the conversation holding a message it answers (In-Reply-To, then
   References, newest first), among this patient's messages only;
2. else the patient's latest conversation with the same professional;
3. else a new conversation.

Subject exactly ``[FIN]`` or header ``X-MSS-MES: FIN`` ends the
conversation, recording who ended it; a later message from that
professional reopens it.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from mssante.store.keys import conversation_context, seal_json, unseal_json
from mssante.store.models import Conversation, Delivery, Message


def is_fin(subject: str | None, mss_headers: dict[str, str]) -> bool:
    for name, value in mss_headers.items():
        if name.lower() == "x-mss-mes" and value.strip().upper() == "FIN":
            return True
    return subject is not None and subject.strip() == "[FIN]"


async def find_conversation(
    session: AsyncSession, *, patient_id: int, professional: str, refs: list[str]
) -> Conversation | None:
    if refs:
        conv_id = await session.scalar(
            select(Delivery.conversation_id)
            .join(Message, Message.id == Delivery.message_id)
            .where(Delivery.patient_id == patient_id, Message.message_id.in_(refs))
            .order_by(Delivery.id.desc())
            .limit(1)
        )
        if conv_id is not None:
            return await session.get(Conversation, conv_id)
    return await session.scalar(
        select(Conversation)
        .where(Conversation.patient_id == patient_id, Conversation.professional == professional)
        .order_by(Conversation.last_message_at.desc(), Conversation.id.desc())
        .limit(1)
    )


def seal_conversation(dek: bytes, patient_id: int, name: str | None, subject: str | None) -> bytes:
    return seal_json(dek, {"name": name, "subject": subject}, conversation_context(patient_id))


def open_conversation(dek: bytes, conv: Conversation) -> dict[str, str | None]:
    value: dict[str, str | None] = unseal_json(
        dek, conv.sealed, conversation_context(conv.patient_id)
    )
    return value


async def thread(
    session: AsyncSession,
    *,
    dek: bytes,
    patient_id: int,
    professional: str,
    professional_name: str | None,
    subject: str | None,
    refs: list[str],
    fin: bool,
    at: datetime,
) -> Conversation:
    conv = await find_conversation(
        session, patient_id=patient_id, professional=professional, refs=refs
    )
    if conv is None:
        conv = Conversation(
            patient_id=patient_id,
            professional=professional,
            sealed=seal_conversation(dek, patient_id, professional_name, subject),
            started_at=at,
            last_message_at=at,
            ended_at=None,
            ended_by=None,
        )
        session.add(conv)
    else:
        conv.last_message_at = max(conv.last_message_at, at)
        if professional_name and professional == conv.professional:
            names = open_conversation(dek, conv)
            if names["name"] != professional_name:
                conv.sealed = seal_conversation(
                    dek, patient_id, professional_name, names["subject"]
                )
    if fin:
        conv.ended_at = at
        conv.ended_by = professional
    elif conv.ended_at is not None and professional in (conv.ended_by, conv.professional):
        # DOMAIN.md 4: any later message from that professional reopens it.
        conv.ended_at = None
        conv.ended_by = None
    await session.flush()
    return conv
