"""The admin API application: routes, errors and the OpenAPI description in one place.

FastAPI builds the OpenAPI description from the same pydantic models that
validate the requests (schemas.py), so the two cannot drift; it runs on
Starlette like the webmail.  The interactive documentation pages (Swagger
UI, ReDoc) are off: they load JavaScript from CDNs.  ``GET /openapi.json``
serves the description, behind the same authentication as the rest.

Every change goes through the single writer (``store.writer.run``) as
store/patient_changes.py jobs, audited with the request's correlation id.

A bulk (``POST /v1/patients/bulk``) is **not atomic**: each item is checked
and applied on its own and gets its own result; items are written in order,
in transactions of :data:`BULK_CHUNK` so that the writer stays free for
incoming mail between them.  If the database fails, the items not written
yet are answered ``not_applied`` (503); every item is idempotent (PUT
replaces, PATCH sets), so sending the bulk again is safe.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import AfterValidator, BaseModel, TypeAdapter, ValidationError
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware

from mssante.admin import problems
from mssante.admin.auth import Authenticator, TokenFile
from mssante.admin.gate import (
    STATE_KEY,
    ActionRecord,
    AdminGate,
    Message,
    Receive,
    Scope,
    Send,
    record_of,
)
from mssante.admin.gate import ASGIApp as GateApp
from mssante.admin.problems import Kind, ProblemError
from mssante.admin.queues import patient_view, queue_state
from mssante.admin.schemas import (
    INS_PATTERN,
    BulkItem,
    BulkRequest,
    BulkResponse,
    FieldError,
    ItemResult,
    PatchItem,
    PatientPatch,
    PatientRecord,
    PatientView,
    Problem,
    PutItem,
    Queues,
    valid_ins,
)
from mssante.clock import Clock
from mssante.pseudonym import Pseudonymizer
from mssante.settings import Settings
from mssante.store.patient_changes import FIELDS, Applied, PatientChange, Refusal, Refused, apply

if TYPE_CHECKING:
    from mssante.app import Store

log = logging.getLogger("mssante.admin")

API_VERSION = "1"
BULK_CHUNK = 200  # bulk items per writer transaction
# Body limit per item a bulk may hold: a real profile's JSON takes a few hundred
# octets; whoever needs more (long escaped values) sends smaller bulks.
_ITEM_OCTETS = 2048

_BULK_ITEM: TypeAdapter[PutItem | PatchItem] = TypeAdapter(BulkItem)

InsPath = Annotated[
    str,
    AfterValidator(valid_ins),
    Path(
        description="The patient's matricule INS (15 characters, key included).",
        json_schema_extra={"minLength": 15, "maxLength": 15, "pattern": INS_PATTERN},
    ),
]

DESCRIPTION = """\
The patient directory of the patient.mssante.fr mailboxes, for the insurer's
account system: profile creations, activations, oppositions, closures and
re-creations, e-mail and postal address changes, one at a time or in bulk;
a profile's state and the queues' depth.

Authentication: mutual TLS (a client certificate from the configured CAs),
a bearer token, or both, as configured. Errors are RFC 9457 problem details
(`application/problem+json`); switch on their `type`. Every answer carries
`X-Request-Id`: send your own (8-64 characters of `A-Za-z0-9._:-`) to find
the request in our audit trail and logs.

A bulk is not atomic: each item gets its own result and the valid ones are
applied even when others are refused. Items are applied in order; sending
a bulk again is safe.
"""


@dataclass(frozen=True, slots=True)
class AdminContext:
    store: Store
    clock: Clock
    pseudonym: Pseudonymizer
    max_bulk: int


def create_app(
    store: Store, settings: Settings, *, clock: Clock, pseudonym: Pseudonymizer
) -> GateApp:
    admin = settings.admin
    auth = Authenticator(
        tokens=TokenFile(admin.tokens_file) if admin.tokens_file is not None else None,
        certificate=admin.client_ca is not None,
    )
    app = _AdminApi(
        auth=auth,
        max_bulk=admin.max_bulk,
        title="mssante admin API",
        version=API_VERSION,
        description=DESCRIPTION,
        openapi_url="/openapi.json",
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
        # Inside Starlette's ServerErrorMiddleware, which would log a second
        # time (with the URL, so the INS) and drop the connection.
        middleware=[Middleware(InternalErrors)],
        exception_handlers={
            ProblemError: _problem,
            RequestValidationError: _invalid,
            HTTPException: _http_error,
        },
    )
    app.include_router(_routes(AdminContext(store, clock, pseudonym, admin.max_bulk)))
    max_body = 64 * 1024 + admin.max_bulk * _ITEM_OCTETS
    return AdminGate(app, auth=auth, max_body=max_body)


# --- routes --------------------------------------------------------------------------


def _action(name: str) -> Any:
    """A dependency naming the request's action for its log line (run even when the
    parameters turn out invalid)."""

    def named(request: Request) -> None:
        record_of(request).action = name

    return Depends(named)


# Problems any operation may answer, and those of an operation with a JSON body.
_ALWAYS = (Kind.UNAUTHENTICATED, Kind.INVALID_TOKEN, Kind.INTERNAL, Kind.UNAVAILABLE)
_BODY = (Kind.BAD_REQUEST, Kind.BODY_TOO_LARGE, Kind.UNSUPPORTED_MEDIA_TYPE, Kind.INVALID)


def _responses(*kinds: Kind, ok: dict[int, type[BaseModel]] | None = None) -> dict[int | str, Any]:
    """The answers an operation documents: its successes and its problems."""
    out: dict[int | str, Any] = {
        status: {"model": model, "description": "Created" if status == 201 else "OK"}
        for status, model in (ok or {}).items()
    }
    titles: dict[int, list[str]] = {}
    for kind in (*_ALWAYS, *kinds):
        titles.setdefault(kind.status, []).append(kind.title)
    for status in sorted(titles):
        out[status] = {
            "description": "; ".join(titles[status]),
            "content": {problems.MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
    return out


def _routes(ctx: AdminContext) -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.get(
        "/patients/{ins}",
        operation_id="getPatient",
        summary="A patient's profile: status, notification channel, addresses",
        response_model=PatientView,
        dependencies=[_action("patient.read")],
        responses=_responses(Kind.PATIENT_NOT_FOUND, Kind.INVALID),
    )
    async def read_patient(request: Request, ins: InsPath) -> PatientView:
        record = record_of(request)
        record.patient = ctx.pseudonym(ins)
        view = await _view(ctx, ins)
        record.outcome = "found"
        return view

    @router.put(
        "/patients/{ins}",
        operation_id="putPatient",
        summary="Create a profile, or replace all its fields",
        description="Fields left out become empty. Links to representatives and helpers"
        " are left as they are.",
        response_model=PatientView,
        dependencies=[_action("patient.put")],
        responses=_responses(
            *_BODY,
            Kind.STATUS_CHANGE_REFUSED,
            Kind.ACTIVATION_EMAIL_REQUIRED,
            ok={201: PatientView},
        ),
    )
    async def put_patient(
        request: Request, response: Response, ins: InsPath, body: PatientRecord
    ) -> PatientView:
        change = PatientChange(ins, _values(body, FIELDS), create=True)
        applied = await _apply_one(ctx, record_of(request), change)
        response.status_code = 201 if applied.created else 200
        return await _view(ctx, ins)

    @router.patch(
        "/patients/{ins}",
        operation_id="patchPatient",
        summary="Change some fields: status (activation, opposition, closure, re-creation),"
        " e-mail addresses, postal address",
        description="A JSON merge patch (RFC 7396): absent fields are left as they are,"
        " null clears one.",
        response_model=PatientView,
        dependencies=[_action("patient.patch")],
        responses=_responses(
            *_BODY,
            Kind.PATIENT_NOT_FOUND,
            Kind.STATUS_CHANGE_REFUSED,
            Kind.ACTIVATION_EMAIL_REQUIRED,
        ),
    )
    async def patch_patient(request: Request, ins: InsPath, body: PatientPatch) -> PatientView:
        change = PatientChange(ins, _values(body, body.model_fields_set))
        await _apply_one(ctx, record_of(request), change)
        return await _view(ctx, ins)

    @router.post(
        "/patients/bulk",
        operation_id="bulkPatients",
        summary="Many PUT and PATCH changes, each with its own result (not atomic)",
        response_model=BulkResponse,
        response_model_exclude_none=True,
        dependencies=[_action("patient.bulk")],
        responses=_responses(*_BODY, Kind.TOO_MANY_ITEMS),
    )
    async def bulk(request: Request, body: BulkRequest) -> BulkResponse:
        record = record_of(request)
        record.count = len(body.items)
        if len(body.items) > ctx.max_bulk:
            raise ProblemError(
                Kind.TOO_MANY_ITEMS,
                f"{len(body.items)} items; at most {ctx.max_bulk} in one request: split it",
            )
        results = await _bulk(ctx, record, body.items)
        counts = Counter[str](result.outcome for result in results)
        record.counts = dict(counts)
        applied = sum(counts[o] for o in ("created", "updated", "unchanged"))
        record.outcome = (
            "applied" if applied == len(results) else "partial" if applied else "refused"
        )
        return BulkResponse(results=results, counts=dict(counts))

    @router.get(
        "/queues",
        operation_id="getQueues",
        summary="Depth of the outbound queue and of the notifications not sent yet",
        response_model=Queues,
        dependencies=[_action("queues.read")],
        responses=_responses(),
    )
    async def queues() -> Queues:
        async with ctx.store.reads() as session:
            return await queue_state(session, now=ctx.clock.now())

    return router


def _values(body: BaseModel, keys: Sequence[str] | set[str]) -> dict[str, Any]:
    """The request's fields as the directory stores them."""
    out: dict[str, Any] = {}
    for key in keys:
        value = getattr(body, key)
        if key == "postal_address" and value is not None:
            value = "\n".join(value)
        elif key == "activation_email" and value is not None:
            value = value.lower()  # the webmail logs in by it (store/credentials.py)
        out[key] = value if value != "" else None
    return out


async def _view(ctx: AdminContext, ins: str) -> PatientView:
    async with ctx.store.reads() as session:
        view = await patient_view(session, ins)
    if view is None:
        raise ProblemError(Kind.PATIENT_NOT_FOUND)
    return view


def _refusal(refused: Refused, pointer_base: str = "#") -> ProblemError:
    match refused.reason:
        case Refusal.NOT_FOUND:
            return ProblemError(Kind.PATIENT_NOT_FOUND, refused.detail)
        case Refusal.ACTIVATED_TO_CREATED:
            return ProblemError(Kind.STATUS_CHANGE_REFUSED, refused.detail)
        case Refusal.ACTIVATION_EMAIL_REQUIRED:
            pointer = f"{pointer_base}/activation_email"
            error = FieldError(detail=refused.detail, pointer=pointer)
            return ProblemError(Kind.ACTIVATION_EMAIL_REQUIRED, refused.detail, errors=[error])


def _job(
    changes: Sequence[tuple[int | None, PatientChange]], *, ctx: AdminContext, record: ActionRecord
) -> Callable[[AsyncSession], Awaitable[list[Applied | Refused]]]:
    """A writer job applying ``changes`` (with their bulk index, if any) in order."""
    at = ctx.clock.now()
    actor = record.actor
    assert actor is not None  # the gate let the request in

    async def job(session: AsyncSession) -> list[Applied | Refused]:
        out = []
        for index, change in changes:
            details: dict[str, Any] = {"correlation": record.correlation_id}
            if index is not None:
                details["item"] = index
            out.append(await apply(session, change, at=at, actor=actor, details=details))
        return out

    return job


async def _apply_one(ctx: AdminContext, record: ActionRecord, change: PatientChange) -> Applied:
    record.patient = ctx.pseudonym(change.ins)
    [result] = await ctx.store.writer.run(_job([(None, change)], ctx=ctx, record=record))
    if isinstance(result, Refused):
        record.outcome = result.reason.value
        raise _refusal(result)
    record.outcome = result.outcome
    return result


def _item_change(item: PutItem | PatchItem) -> PatientChange:
    if isinstance(item, PatchItem):
        return PatientChange(item.ins, _values(item, item.model_fields_set - {"op", "ins"}))
    return PatientChange(item.ins, _values(item, FIELDS), create=True)


def _invalid_item(index: int, raw: Any, exc: ValidationError) -> ItemResult:
    errors = []
    for error in exc.errors():
        loc = list(error["loc"])
        if loc[:1] in (["put"], ["patch"]):
            loc = loc[1:]  # the union's tag: not part of the item
        errors.append({**error, "loc": loc})
    base = f"#/items/{index}"
    found = raw.get("ins") if isinstance(raw, dict) else None
    ins = None
    if isinstance(found, str):
        with contextlib.suppress(ValueError):
            ins = valid_ins(found)
    return ItemResult(
        index=index,
        ins=ins,
        status=Kind.INVALID.status,
        outcome="invalid",
        problem=problems.problem(
            Kind.INVALID, errors=problems.field_errors(errors, pointer_base=base)
        ),
    )


def _result(index: int, ins: str, outcome: Applied | Refused) -> ItemResult:
    if isinstance(outcome, Applied):
        return ItemResult(
            index=index,
            ins=ins,
            status=201 if outcome.created else 200,
            outcome=outcome.outcome,
        )
    error = _refusal(outcome, f"#/items/{index}")
    return ItemResult(
        index=index,
        ins=ins,
        status=error.kind.status,
        outcome="refused",
        problem=problems.problem(error.kind, error.detail, errors=error.errors),
    )


async def _bulk(ctx: AdminContext, record: ActionRecord, items: list[Any]) -> list[ItemResult]:
    results: dict[int, ItemResult] = {}
    changes: list[tuple[int, PatientChange]] = []
    for index, raw in enumerate(items):
        try:
            item = _BULK_ITEM.validate_python(raw)
        except ValidationError as exc:
            results[index] = _invalid_item(index, raw, exc)
        else:
            changes.append((index, _item_change(item)))
    for start in range(0, len(changes), BULK_CHUNK):
        chunk = changes[start : start + BULK_CHUNK]
        try:
            outcomes = await ctx.store.writer.run(_job(chunk, ctx=ctx, record=record))
        except OperationalError:
            log.warning(
                "admin: database unavailable during a bulk (log_id=%s); %d items not applied",
                record.correlation_id,
                len(changes) - start,
                exc_info=True,
            )
            unavailable = problems.problem(Kind.UNAVAILABLE, log_id=record.correlation_id)
            for index, change in changes[start:]:
                results[index] = ItemResult(
                    index=index,
                    ins=change.ins,
                    status=Kind.UNAVAILABLE.status,
                    outcome="not_applied",
                    problem=unavailable,
                )
            break
        for (index, change), outcome in zip(chunk, outcomes, strict=True):
            results[index] = _result(index, change.ins, outcome)
    return [results[index] for index in range(len(items))]


# --- errors ------------------------------------------------------------------------------


async def _problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProblemError)
    record = record_of(request)
    record.outcome = record.outcome or exc.kind.slug
    return problems.response(exc.kind, exc.detail, errors=exc.errors, headers=exc.headers)


async def _invalid(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    record_of(request).outcome = "invalid"
    return problems.response(Kind.INVALID, errors=problems.field_errors(exc.errors()))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = problems.BY_STATUS.get(exc.status_code, Kind.BAD_REQUEST)
    record_of(request).outcome = record_of(request).outcome or kind.slug
    # Starlette's details are its titles ("Not Found"); ours say more.
    detail = exc.detail if kind in (Kind.BAD_REQUEST, Kind.BODY_TOO_LARGE) else None
    return problems.response(kind, detail, headers=exc.headers)


class InternalErrors:
    """An unexpected exception becomes a 500 problem whose ``log_id`` is the request's
    correlation id, logged with its traceback; a database that cannot be reached
    becomes a 503 (try again)."""

    def __init__(self, app: GateApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            record: ActionRecord = scope["state"][STATE_KEY]
            unavailable = isinstance(exc, OperationalError)
            level = logging.WARNING if unavailable else logging.ERROR
            what = "database unavailable" if unavailable else "internal error"
            log.log(level, "admin: %s (log_id=%s)", what, record.correlation_id, exc_info=True)
            if started:  # too late for a problem: the server closes the connection
                raise
            record.outcome = "error"
            kind = Kind.UNAVAILABLE if unavailable else Kind.INTERNAL
            await problems.response(kind, log_id=record.correlation_id)(scope, receive, send)


# --- OpenAPI -----------------------------------------------------------------------------


class _AdminApi(FastAPI):
    """FastAPI, with what its description cannot infer: the shape of a bulk item
    (checked one by one, see BulkRequest), the problem schema, the bulk limit
    and how to authenticate."""

    def __init__(self, *, auth: Authenticator, max_bulk: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._auth = auth
        self._max_bulk = max_bulk

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is not None:
            return self.openapi_schema
        spec = super().openapi()
        schemas: dict[str, Any] = spec.setdefault("components", {}).setdefault("schemas", {})
        ref = "#/components/schemas/{model}"
        added = {
            "BulkItem": _BULK_ITEM.json_schema(ref_template=ref),
            "Problem": Problem.model_json_schema(ref_template=ref),
        }
        for name, definition in added.items():
            for inner, inner_definition in definition.pop("$defs", {}).items():
                schemas.setdefault(inner, inner_definition)
            schemas[name] = definition
        schemas["BulkRequest"]["properties"]["items"]["maxItems"] = self._max_bulk
        security: dict[str, Any] = {}
        if self._auth.certificate:
            security["mutualTLS"] = {"type": "mutualTLS"}
        if self._auth.tokens is not None:
            security["bearerAuth"] = {"type": "http", "scheme": "bearer"}
        spec["components"]["securitySchemes"] = security
        # One requirement naming both: both are needed (OpenAPI 3.1, 4.8.30).
        spec["security"] = [{name: [] for name in security}]
        for operations in spec["paths"].values():
            for operation in operations.values():
                for answer in operation["responses"].values():
                    answer.setdefault("headers", {})["X-Request-Id"] = _REQUEST_ID_HEADER
        return spec


_REQUEST_ID_HEADER = {
    "description": "The correlation id of the request in the audit trail and the logs:"
    " the client's own X-Request-Id if it was 8-64 characters of A-Za-z0-9._:-"
    " (starting with a letter or digit), else a new one.",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._:-]{7,63}$"},
}
