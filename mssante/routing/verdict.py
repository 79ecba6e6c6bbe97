"""What routing decides about a recipient: a value, never an exception (STYLE.md 3)."""

from __future__ import annotations

from dataclasses import dataclass

from mssante.smtp.replies import Reply
from mssante.store.models import ProfileStatus


@dataclass(frozen=True, slots=True)
class Deliver:
    """Store the message in this patient's mailbox."""

    patient_id: int
    ins: str
    status: ProfileStatus


@dataclass(frozen=True, slots=True)
class Refuse:
    """Refuse the recipient; ``reply`` goes to the client, ``reason`` to the log.

    ``cause`` names the refusal for the audit trail and metrics; ``patient_id``
    is set when the patient is known (their activity history shows it).
    """

    reply: Reply
    reason: str
    cause: str
    patient_id: int | None = None


Verdict = Deliver | Refuse
