"""Threading a patient's messages into conversations (DOMAIN.md 4).

A message joins, in this order:
1. the conversation holding a message it answers (In-Reply-To, then
   References, newest first), among this patient's messages only;
2. else the patient's latest conversation with the same professional;
3. else a new conversation.

Subject exactly ``[FIN]`` or header ``X-MSS-MES: FIN`` ends the
conversation, recording who ended it; a later message from that
professional reopens it.

The writer stores the messages waiting together in one transaction
(writer.py), so threading works on a :class:`Threads` snapshot loaded with
two queries for the whole batch and kept up to date in memory as each
message of the batch joins a conversation, in arrival order: the result is
the same as threading the messages one at a time.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from mssante.store.keys import conversation_context, seal_json, unseal_json
from mssante.store.models import Conversation, Delivery, Message


def is_fin(subject: str | None, mss_headers: dict[str, str]) -> bool:
    for name, value in mss_headers.items():
        if name.lower() == "x-mss-mes" and value.strip().upper() == "FIN":
            return True
    return subject is not None and subject.strip() == "[FIN]"


def seal_conversation(dek: bytes, patient_id: int, name: str | None, subject: str | None) -> bytes:
    return seal_json(dek, {"name": name, "subject": subject}, conversation_context(patient_id))


def open_conversation(dek: bytes, conv: Conversation) -> dict[str, str | None]:
    return open_sealed(dek, conv.patient_id, conv.sealed)


def open_sealed(dek: bytes, patient_id: int, sealed: bytes) -> dict[str, str | None]:
    value: dict[str, str | None] = unseal_json(dek, sealed, conversation_context(patient_id))
    return value


# Rows not inserted yet sort after every stored row, in creation order, as
# the ids the database will give them do.
_UNSTORED = 1 << 62
_sequence = itertools.count()


@dataclass(eq=False)
class ConversationState:
    """A conversation as the batch sees it: a stored row or one to insert."""

    id: int | None
    patient_id: int
    professional: str
    sealed: bytes
    started_at: datetime
    last_message_at: datetime
    ended_at: datetime | None
    ended_by: str | None
    changed: bool = False
    order: int = field(default_factory=lambda: _UNSTORED + next(_sequence))

    def __post_init__(self) -> None:
        if self.id is not None:
            self.order = self.id

    def row(self) -> dict[str, object]:
        return {
            "patient_id": self.patient_id,
            "professional": self.professional,
            "sealed": self.sealed,
            "started_at": self.started_at,
            "last_message_at": self.last_message_at,
            "ended_at": self.ended_at,
            "ended_by": self.ended_by,
        }

    @property
    def recency(self) -> tuple[datetime, int]:
        return (self.last_message_at, self.order)


def _state(row: Any) -> ConversationState:
    return ConversationState(
        id=row.id,
        patient_id=row.patient_id,
        professional=row.professional,
        sealed=row.sealed,
        started_at=row.started_at,
        last_message_at=row.last_message_at,
        ended_at=row.ended_at,
        ended_by=row.ended_by,
    )


@dataclass(frozen=True, slots=True)
class Lookup:
    """What a batch threads: whose mailbox, from whom, answering what."""

    patient_id: int
    professional: str
    refs: list[str]


class Threads:
    """Conversation snapshot for one batch, updated as messages join."""

    def __init__(self) -> None:
        self.by_id: dict[int, ConversationState] = {}
        self.new: list[ConversationState] = []
        self._latest: dict[tuple[int, str], ConversationState] = {}
        # (patient, Message-ID) -> (delivery order, conversation)
        self._answers: dict[tuple[int, str], tuple[int, ConversationState]] = {}

    @classmethod
    async def load(cls, conn: AsyncConnection, lookups: Iterable[Lookup]) -> Threads:
        lookups = list(lookups)
        threads = cls()
        pairs = sorted({(lk.patient_id, lk.professional) for lk in lookups})
        refs = sorted({ref for lk in lookups for ref in lk.refs})
        patients = sorted({lk.patient_id for lk in lookups})
        columns = (
            Conversation.id,
            Conversation.patient_id,
            Conversation.professional,
            Conversation.sealed,
            Conversation.started_at,
            Conversation.last_message_at,
            Conversation.ended_at,
            Conversation.ended_by,
        )
        if pairs:
            rows = await conn.execute(
                select(*columns).where(
                    tuple_(Conversation.patient_id, Conversation.professional).in_(pairs)
                )
            )
            for row in rows:
                threads._add(_state(row))
        if refs:
            rows = await conn.execute(
                select(Delivery.id.label("delivery_id"), Message.message_id, *columns)
                .join(Message, Message.id == Delivery.message_id)
                .join(Conversation, Conversation.id == Delivery.conversation_id)
                .where(Delivery.patient_id.in_(patients), Message.message_id.in_(refs))
            )
            for row in rows:
                state = threads.by_id.get(row.id) or _state(row)
                threads._add(state)
                threads._answered(state.patient_id, row.message_id, row.delivery_id, state)
        return threads

    def _add(self, state: ConversationState) -> None:
        if state.id is not None:
            if state.id in self.by_id:
                return
            self.by_id[state.id] = state
        pair = (state.patient_id, state.professional)
        latest = self._latest.get(pair)
        if latest is None or state.recency > latest.recency:
            self._latest[pair] = state

    def _answered(
        self, patient_id: int, message_id: str, order: int, state: ConversationState
    ) -> None:
        key = (patient_id, message_id)
        known = self._answers.get(key)
        if known is None or order > known[0]:
            self._answers[key] = (order, state)

    def find(self, lookup: Lookup) -> ConversationState | None:
        answered = [
            self._answers[(lookup.patient_id, ref)]
            for ref in lookup.refs
            if (lookup.patient_id, ref) in self._answers
        ]
        if answered:
            # The newest delivery among the messages it answers.
            return max(answered, key=lambda a: a[0])[1]
        return self._latest.get((lookup.patient_id, lookup.professional))

    def join(
        self,
        lookup: Lookup,
        *,
        dek: bytes,
        professional_name: str | None,
        subject: str | None,
        message_id: str | None,
        fin: bool,
        at: datetime,
    ) -> ConversationState:
        """Thread one message for one patient; returns its conversation."""
        patient_id, professional = lookup.patient_id, lookup.professional
        conv = self.find(lookup)
        if conv is None:
            conv = ConversationState(
                id=None,
                patient_id=patient_id,
                professional=professional,
                sealed=seal_conversation(dek, patient_id, professional_name, subject),
                started_at=at,
                last_message_at=at,
                ended_at=None,
                ended_by=None,
            )
            self.new.append(conv)
        else:
            conv.last_message_at = max(conv.last_message_at, at)
            conv.changed = True
            if professional_name and professional == conv.professional:
                names = open_sealed(dek, patient_id, conv.sealed)
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
        # The pair's latest conversation may have changed; later messages
        # of the batch answering this one find it.
        self._latest_touch(conv)
        if message_id:
            self._answered(patient_id, message_id, _UNSTORED + next(_sequence), conv)
        return conv

    def _latest_touch(self, conv: ConversationState) -> None:
        pair = (conv.patient_id, conv.professional)
        latest = self._latest.get(pair)
        if latest is None or conv.recency >= latest.recency:
            self._latest[pair] = conv

    @property
    def changed(self) -> list[ConversationState]:
        return [c for c in self.by_id.values() if c.changed]
