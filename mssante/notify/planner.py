"""Who is told about a new message, and how (DOMAIN.md 3).

Pure decisions, written as rows of the notification outbox in the same
transaction as the delivery (STYLE.md 7); sending is the worker's job.

| profile of the person told | channel |
|---|---|
| activated | e-mail to the address registered at activation |
| created, not activated | e-mail to the address known to the insurer, else a postal statement |
| opposed or closed | nothing for their own mailbox; as a minor's representative: |
|                   | insurer e-mail, else postal (our choice)                  |

An address marked invalid (a notification bounced) counts as no address.
For a minor (a profile with representatives attached) each legal
representative is told through their own channel; the minor is told too
once they activated their own profile.  Helpers (aidants) read the mailbox
but are not notified (our choice: DOMAIN.md 3 names only the profile owner
and, for minors, the representatives).
"""

from __future__ import annotations

from dataclasses import dataclass

from mssante.store.models import Channel, ProfileStatus


@dataclass(frozen=True, slots=True)
class Profile:
    id: int
    status: ProfileStatus
    activation_email: str | None
    insurer_email: str | None
    email_invalid: bool


@dataclass(frozen=True, slots=True)
class PlannedNotification:
    recipient_id: int
    channel: Channel
    email: str | None = None


def _email_or_postal(person: Profile, email: str | None) -> PlannedNotification:
    if email and not person.email_invalid:
        return PlannedNotification(person.id, Channel.EMAIL, email)
    return PlannedNotification(person.id, Channel.POSTAL)


def own_channel(person: Profile) -> PlannedNotification | None:
    """How a person is told about mail in their own mailbox."""
    match person.status:
        case ProfileStatus.ACTIVATED:
            return _email_or_postal(person, person.activation_email)
        case ProfileStatus.CREATED:
            return _email_or_postal(person, person.insurer_email)
        case _:
            return None


def representative_channel(person: Profile) -> PlannedNotification:
    """How a legal representative is told about mail in a minor's mailbox."""
    planned = own_channel(person)
    if planned is not None:
        return planned
    # Opposing one's own mailbox is not refusing news of one's child's.
    return _email_or_postal(person, person.insurer_email)


def plan(patient: Profile, representatives: list[Profile]) -> list[PlannedNotification]:
    if not patient.status.accepts_mail:
        return []
    if not representatives:
        planned = own_channel(patient)
        return [planned] if planned else []
    out = [representative_channel(rep) for rep in representatives]
    if patient.status is ProfileStatus.ACTIVATED:
        own = own_channel(patient)
        if own is not None:
            out.append(own)
    return out
