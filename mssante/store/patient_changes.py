"""Changes to one patient pushed by the insurer's account system (the admin API).

A change names the fields it sets; :func:`apply` runs inside a writer job
and answers with a value: :class:`Applied` (what changed) or
:class:`Refused` (why not, for the caller).  Refusals are not exceptions,
so a bulk of changes in one transaction keeps its good items when one is
refused.

A status change does what the same change does elsewhere in the code, so a
profile is in the same state whichever way it got there:

- **leaving "created"** (activated, opposed, closed): unused provisional
  activation codes are revoked.  The webmail only accepts a code for a
  created profile, so a code left alive would work again if the profile
  were ever re-created (credentials.py marks them used on the webmail's own
  activation);
- **opposed or closed**: every web session on the mailbox ends, those of
  representatives reading it included (credentials.close_mailbox); the
  gateway refuses mail from the next RCPT on (DOMAIN.md 3);
- **activated** needs the address registered at activation (DOMAIN.md 3:
  an activated profile is notified there; patient_import has the same
  rule); ``activated_at`` keeps the first activation;
- **activated -> created** is refused: "activated" means the patient has
  logged in (DOMAIN.md 3), which cannot be undone; a profile is closed or
  opposed instead, then re-created from there.

Audit events use the kinds the patient's history already tells
(store/mailbox.py): ``patient.created``, ``patient.activated``,
``mailbox.closed``, ``patient.status_changed``, ``patient.updated``; each
carries the request's correlation id.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Literal

from sqlalchemy import delete, or_, update
from sqlalchemy.ext.asyncio import AsyncSession

from mssante.store import audit
from mssante.store.directory import get_patient
from mssante.store.models import ActivationCode, Patient, ProfileStatus, WebSession

# What a change may set, in the order the audit event lists them.
FIELDS = (
    "status",
    "activation_email",
    "insurer_email",
    "given_name",
    "family_name",
    "birth_date",
    "postal_address",
)
_EMAILS = frozenset({"activation_email", "insurer_email"})


@dataclass(frozen=True, slots=True)
class PatientChange:
    """What the insurer asks for one patient.

    ``values`` holds the fields given, checked and normalised (e-mail
    addresses lower-case for the activation one, the postal address as
    lines joined by ``"\\n"``); a field absent is left as it is.  With
    ``create`` an unknown INS becomes a new profile (``values`` then has a
    status); without it an unknown INS is refused.
    """

    ins: str
    values: Mapping[str, str | date | ProfileStatus | None]
    create: bool = False


class Refusal(enum.StrEnum):
    NOT_FOUND = "not_found"
    ACTIVATION_EMAIL_REQUIRED = "activation_email_required"
    ACTIVATED_TO_CREATED = "activated_to_created"


@dataclass(frozen=True, slots=True)
class Refused:
    reason: Refusal
    detail: str  # English, for the insurer's developers; never contains the INS


@dataclass(frozen=True, slots=True)
class Applied:
    patient_id: int
    created: bool
    changed: tuple[str, ...]  # fields whose value changed (FIELDS order)

    @property
    def outcome(self) -> Literal["created", "updated", "unchanged"]:
        if self.created:
            return "created"
        return "updated" if self.changed else "unchanged"


async def apply(
    session: AsyncSession,
    change: PatientChange,
    *,
    at: datetime,
    actor: str,
    details: Mapping[str, Any],
) -> Applied | Refused:
    """Apply ``change`` in the caller's (writer) transaction.

    ``details`` go into every audit event written (the correlation id).
    Raises ValueError for a change that is not one (unknown fields, a
    creation without status): the caller's mistake, not the insurer's.
    """
    unknown = set(change.values) - set(FIELDS)
    if unknown:
        raise ValueError(f"not patient fields: {sorted(unknown)}")
    patient = await get_patient(session, change.ins)
    if patient is None:
        if not change.create:
            return Refused(Refusal.NOT_FOUND, "no patient with this INS")
        return await _create(session, change, at=at, actor=actor, details=details)
    wanted = {key: change.values.get(key, getattr(patient, key)) for key in FIELDS}
    status = ProfileStatus(wanted["status"])
    refusal = _refusal(patient.status, status, wanted)
    if refusal is not None:
        return refusal
    changed = tuple(key for key in FIELDS if getattr(patient, key) != wanted[key])
    if not changed:
        return Applied(patient.id, created=False, changed=())
    old_status = patient.status
    for key in changed:
        setattr(patient, key, wanted[key])
    if _EMAILS & set(changed):
        # A new address has not bounced (notify/bounces.py), as in directory.upsert_patient.
        patient.email_invalid = False
    patient.updated_at = at
    if status is not old_status:
        await _status_changed(session, patient, old_status, at=at, actor=actor, details=details)
    others = [key for key in changed if key != "status"]
    if others:
        await audit.append(
            session,
            at=at,
            kind="patient.updated",
            actor=actor,
            patient_id=patient.id,
            details={**details, "fields": others},
        )
    return Applied(patient.id, created=False, changed=changed)


def _refusal(
    old: ProfileStatus | None, new: ProfileStatus, wanted: Mapping[str, Any]
) -> Refused | None:
    if old is ProfileStatus.ACTIVATED and new is ProfileStatus.CREATED:
        return Refused(
            Refusal.ACTIVATED_TO_CREATED,
            "an activated profile cannot become 'created' again (the patient has logged in):"
            " close or oppose it, then re-create it",
        )
    if new is ProfileStatus.ACTIVATED and not wanted["activation_email"]:
        return Refused(
            Refusal.ACTIVATION_EMAIL_REQUIRED,
            "an activated profile needs activation_email: notifications go there",
        )
    return None


async def _create(
    session: AsyncSession,
    change: PatientChange,
    *,
    at: datetime,
    actor: str,
    details: Mapping[str, Any],
) -> Applied | Refused:
    if change.values.get("status") is None:
        raise ValueError("a new profile needs a status")
    wanted = {key: change.values.get(key) for key in FIELDS}
    status = ProfileStatus(str(wanted["status"]))
    refusal = _refusal(None, status, wanted)
    if refusal is not None:
        return refusal
    patient = Patient(
        ins=change.ins,
        email_invalid=False,
        created_at=at,
        updated_at=at,
        activated_at=at if status is ProfileStatus.ACTIVATED else None,
        **wanted,
    )
    session.add(patient)
    await session.flush()
    await audit.append(
        session,
        at=at,
        kind="patient.created",
        actor=actor,
        patient_id=patient.id,
        details={**details, "status": status.value},
    )
    given = tuple(key for key in FIELDS if wanted[key] is not None)
    return Applied(patient.id, created=True, changed=given)


async def _status_changed(
    session: AsyncSession,
    patient: Patient,
    old: ProfileStatus,
    *,
    at: datetime,
    actor: str,
    details: Mapping[str, Any],
) -> None:
    new = patient.status
    event: dict[str, Any] = {**details, "from": old.value, "to": new.value}
    if old is ProfileStatus.CREATED:
        revoked = await session.execute(
            update(ActivationCode)
            .where(
                ActivationCode.patient_id == patient.id,
                ActivationCode.used_at.is_(None),
                ActivationCode.revoked_at.is_(None),
            )
            .values(revoked_at=at)
        )
        event["codes_revoked"] = int(getattr(revoked, "rowcount", 0) or 0)
    if not new.accepts_mail:
        ended = await session.execute(
            delete(WebSession).where(
                or_(WebSession.patient_id == patient.id, WebSession.acting_for == patient.id)
            )
        )
        event["sessions_ended"] = int(getattr(ended, "rowcount", 0) or 0)
    if new is ProfileStatus.ACTIVATED:
        patient.activated_at = patient.activated_at or at
        kind = "patient.activated"
    elif new is ProfileStatus.CLOSED:
        kind = "mailbox.closed"
    else:
        kind = "patient.status_changed"
    await audit.append(session, at=at, kind=kind, actor=actor, patient_id=patient.id, details=event)
