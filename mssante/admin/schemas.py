"""What the admin API accepts and answers: pydantic models, also its OpenAPI description.

The checks are the patient import's (store/patient_import.py): the INS by
routing/ins.py (layout, month, Corsica, key), e-mail addresses by
email-validator without DNS, names of at most 200 characters, a postal
address of at most 2,000 characters; plus no control characters in names
and address lines (they end up on printed letters).  Unknown keys are
refused, so a misspelt field is an error and not a silent no-op.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Annotated, Any, Literal

from email_validator import EmailNotValidError, validate_email
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
)

from mssante.routing.ins import INS_LENGTH, Ins, parse_ins
from mssante.store.models import Channel, ProfileStatus

# For the description only: parse_ins decides, with a message saying which check failed.
INS_PATTERN = r"^[123478][0-9]{4}(?:[0-9]{2}|2[ABab])[0-9]{8}$"
ADDRESS_MAX = 2000  # models.Patient.postal_address, as patient_import
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def valid_ins(value: str) -> str:
    """The INS normalised (``2a`` -> ``2A``); ValueError saying which check failed."""
    parsed = parse_ins(value)
    if not isinstance(parsed, Ins):
        raise ValueError(f"not a valid INS: {parsed.detail}")
    return parsed.value


def _email(value: str) -> str:
    try:
        return validate_email(value.strip(), check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise ValueError(str(exc)) from None


def _text(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("control characters are not allowed")
    return value.strip()


def _iso_date(value: Any) -> Any:
    # pydantic would also take a number of seconds since 1970: only YYYY-MM-DD.
    if isinstance(value, str) and not _ISO_DATE.fullmatch(value):
        raise ValueError("a date is written YYYY-MM-DD")
    if not isinstance(value, str | date):
        raise ValueError("a date is a string YYYY-MM-DD")
    return value


def _not_null(value: Any) -> Any:
    # A merge patch's null clears a field; a profile always has a status.
    if value is None:
        raise ValueError("a profile always has a status: it cannot be null")
    return value


def _without_null(schema: dict[str, Any]) -> None:
    """The description of a field that may be absent but not null."""
    schema["anyOf"] = [s for s in schema["anyOf"] if s.get("type") != "null"]


def _address_fits(lines: list[str]) -> list[str]:
    kept = [line for line in lines if line]
    if len("\n".join(kept)) > ADDRESS_MAX:
        raise ValueError(f"longer than {ADDRESS_MAX} characters in all")
    return kept


InsText = Annotated[
    str,
    AfterValidator(valid_ins),
    Field(
        description="The matricule INS: 13 characters of NIR or NIA and a 2-digit key.",
        examples=["146026322000196"],
        json_schema_extra={
            "minLength": INS_LENGTH,
            "maxLength": INS_LENGTH,
            "pattern": INS_PATTERN,
        },
    ),
]
Email = Annotated[
    str,
    Field(max_length=320, json_schema_extra={"format": "email"}),
    AfterValidator(_email),
]
Name = Annotated[str, Field(max_length=200), AfterValidator(_text)]
AddressLine = Annotated[str, Field(max_length=200), AfterValidator(_text)]
PostalAddress = Annotated[
    list[AddressLine],
    Field(max_length=10, description="Lines of the postal address, as printed on an envelope."),
    AfterValidator(_address_fits),
]
IsoDate = Annotated[date, BeforeValidator(_iso_date)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Contact(_Model):
    activation_email: Email | None = Field(
        None,
        description="The personal address registered at activation; needed when activated"
        " (notifications go there).",
    )
    insurer_email: Email | None = Field(
        None,
        description="The address known to the insurer: notifications of a created profile.",
    )
    given_name: Name | None = None
    family_name: Name | None = None
    birth_date: IsoDate | None = Field(None, description="YYYY-MM-DD; activation asks for it.")
    postal_address: PostalAddress | None = Field(
        None, description="Where postal activity statements go when there is no e-mail address."
    )


class PatientRecord(_Contact):
    """A whole profile (PUT): fields left out become empty."""

    status: ProfileStatus


class PatientPatch(_Contact):
    """Fields to change (PATCH, JSON merge patch, RFC 7396): absent means unchanged,
    null means cleared.  Status changes: created (re-creation after an opposition or
    a closure), activated, opposed, closed."""

    status: Annotated[ProfileStatus | None, BeforeValidator(_not_null)] = Field(
        None, json_schema_extra=_without_null
    )


class PutItem(PatientRecord):
    op: Literal["put"] = Field(description="Create or replace, as PUT /v1/patients/{ins}.")
    ins: InsText


class PatchItem(PatientPatch):
    op: Literal["patch"] = Field(description="Change some fields, as PATCH /v1/patients/{ins}.")
    ins: InsText


BulkItem = Annotated[PutItem | PatchItem, Field(discriminator="op")]


class BulkRequest(_Model):
    """Each item is checked on its own: a bad one gets its own result, the others go on."""

    items: list[Any] = Field(
        min_length=1,
        # Checked item by item (api.py); described as what each must be.
        json_schema_extra={"items": {"$ref": "#/components/schemas/BulkItem"}},
    )


# --- answers -----------------------------------------------------------------------------


class FieldError(BaseModel):
    detail: str
    pointer: str | None = Field(
        None, description="JSON Pointer (RFC 6901) to the value in the request body."
    )
    parameter: str | None = Field(None, description="The path or query parameter.")


class Problem(BaseModel):
    """RFC 9457 problem details (``application/problem+json``)."""

    type: str = Field(description="Stable identifier of the kind of problem (a tag URI).")
    title: str
    status: int
    detail: str | None = None
    errors: list[FieldError] | None = Field(None, description="What is wrong, field by field.")
    log_id: str | None = Field(
        None, description="For an internal error: the reference of the server's log line."
    )


class NotificationCounts(BaseModel):
    pending: int
    failed: int


class PatientView(BaseModel):
    """A profile as the directory holds it (never messages or health content)."""

    ins: str
    status: ProfileStatus
    activation_email: str | None
    insurer_email: str | None
    email_invalid: bool = Field(description="A notification to the address bounced.")
    given_name: str | None
    family_name: str | None
    birth_date: date | None
    postal_address: list[str] | None
    notification_channel: Channel | None = Field(
        description="How the patient is told of a new message now (DOMAIN.md 3); null when"
        " opposed or closed."
    )
    webmail_password: bool = Field(description="The patient has set a webmail password.")
    created_at: datetime
    updated_at: datetime
    activated_at: datetime | None = Field(description="First activation.")
    notifications: NotificationCounts = Field(
        description="Notifications to this patient not sent yet, and given up."
    )


Outcome = Literal["created", "updated", "unchanged", "refused", "invalid", "not_applied"]


class ItemResult(BaseModel):
    index: int = Field(description="Position of the item in the request, from 0.")
    ins: str | None = Field(None, description="The item's INS, when valid.")
    status: int = Field(description="The HTTP status the same change would get alone.")
    outcome: Outcome
    problem: Problem | None = None


class BulkResponse(BaseModel):
    results: list[ItemResult]
    counts: dict[str, int] = Field(description="Items per outcome.")


class Depth(BaseModel):
    count: int
    oldest_age_seconds: float | None = Field(description="Age of the oldest; null when empty.")


class OutboundDepth(BaseModel):
    """Recipients of the outbound queue (replies, read receipts, DSNs) by state."""

    pending: Depth
    held: Depth
    failed: Depth
    sent: Depth = Field(description="Kept until retention.outbound_days.")


class NotificationDepth(BaseModel):
    pending: Depth
    failed: Depth


class NotificationQueues(BaseModel):
    email: NotificationDepth
    postal: NotificationDepth


class Queues(BaseModel):
    at: datetime
    outbound: OutboundDepth
    notifications: NotificationQueues
