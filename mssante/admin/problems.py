"""Every error the admin API answers: RFC 9457 problem details, in one table.

Like the SMTP replies (smtp/replies.py), errors are data: a :class:`Kind`
names the status, a stable ``type`` and a title; code raises
:class:`ProblemError` with a kind, tests import the kinds.  A client
switches on ``type``, never on ``title`` or ``detail``.

``type`` is a tag URI (RFC 4151): RFC 9457 3.1.1 lets it be a URI that
nobody dereferences, and a tag cannot be mistaken for a page to fetch.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any

from starlette.responses import JSONResponse

from mssante.admin.schemas import FieldError, Problem

MEDIA_TYPE = "application/problem+json"
TYPE_PREFIX = "tag:patient.mssante.fr,2026:admin-problem:"


class Kind(enum.Enum):
    BAD_REQUEST = (400, "bad-request", "The request cannot be read")
    UNAUTHENTICATED = (401, "unauthenticated", "Authentication required")
    INVALID_TOKEN = (401, "invalid-token", "Bearer token not accepted")
    NOT_FOUND = (404, "not-found", "No such resource")
    PATIENT_NOT_FOUND = (404, "patient-not-found", "No patient with this INS")
    METHOD_NOT_ALLOWED = (405, "method-not-allowed", "Method not allowed on this resource")
    STATUS_CHANGE_REFUSED = (409, "status-change-refused", "Status change not allowed")
    BODY_TOO_LARGE = (413, "body-too-large", "Request body too large")
    TOO_MANY_ITEMS = (413, "too-many-items", "Too many items in one bulk request")
    UNSUPPORTED_MEDIA_TYPE = (415, "unsupported-media-type", "The body must be JSON")
    INVALID = (422, "invalid-request", "Invalid request")
    ACTIVATION_EMAIL_REQUIRED = (
        422,
        "activation-email-required",
        "An activated profile needs activation_email",
    )
    INTERNAL = (500, "internal-error", "Internal error")
    UNAVAILABLE = (503, "database-unavailable", "Database unavailable, try again")

    def __init__(self, status: int, slug: str, title: str) -> None:
        self.status = status
        self.slug = slug
        self.title = title

    @property
    def type(self) -> str:
        return TYPE_PREFIX + self.slug


# What Starlette and FastAPI raise themselves (unknown path, wrong method, body unreadable).
BY_STATUS = {
    400: Kind.BAD_REQUEST,
    404: Kind.NOT_FOUND,
    405: Kind.METHOD_NOT_ALLOWED,
    413: Kind.BODY_TOO_LARGE,
}


class ProblemError(Exception):
    """Raised by a handler; the application answers it as a problem."""

    def __init__(
        self,
        kind: Kind,
        detail: str | None = None,
        *,
        errors: Sequence[FieldError] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(kind.slug)
        self.kind = kind
        self.detail = detail
        self.errors = list(errors)
        self.headers = dict(headers or {})


def problem(
    kind: Kind,
    detail: str | None = None,
    *,
    errors: Sequence[FieldError] = (),
    log_id: str | None = None,
) -> Problem:
    return Problem(
        type=kind.type,
        title=kind.title,
        status=kind.status,
        detail=detail,
        errors=list(errors) or None,
        log_id=log_id,
    )


def response(
    kind: Kind,
    detail: str | None = None,
    *,
    errors: Sequence[FieldError] = (),
    log_id: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = problem(kind, detail, errors=errors, log_id=log_id)
    return JSONResponse(
        body.model_dump(mode="json", exclude_none=True),
        status_code=kind.status,
        media_type=MEDIA_TYPE,
        headers=dict(headers or {}),
    )


def field_errors(
    errors: Sequence[Mapping[str, Any]], *, pointer_base: str = "#"
) -> list[FieldError]:
    """pydantic (or FastAPI) errors as RFC 9457 ``errors`` members, without the input values.

    A location starting with ``body`` becomes a JSON Pointer into the body,
    ``path``/``query``/``header`` a parameter name; anything else (an item
    of a bulk, checked on its own) a pointer under ``pointer_base``.
    """
    out = []
    for error in errors:
        if error.get("type") == "json_invalid":  # its location is an offset, not a field
            reason = (error.get("ctx") or {}).get("error", "")
            out.append(FieldError(detail=f"not valid JSON: {reason}".rstrip(": ")))
            continue
        loc = [str(part) for part in error.get("loc", ())]
        # "Value error, ..." is pydantic's prefix for a ValueError raised by our checks.
        detail = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if loc and loc[0] in ("path", "query", "header") and len(loc) > 1:
            out.append(FieldError(detail=detail, parameter=loc[1]))
            continue
        base = "#" if loc[:1] == ["body"] else pointer_base
        parts = loc[1:] if loc[:1] == ["body"] else loc
        pointer = base + "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)
        out.append(FieldError(detail=detail, pointer=pointer))
    return out
