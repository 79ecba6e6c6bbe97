"""What every admin request goes through, before and after the application.

A pure ASGI middleware, outermost:

1. the correlation id: the client's ``X-Request-Id`` if it is a safe token
   (it is written to the logs and the audit trail), else a new one; sent
   back in the response's ``X-Request-Id``;
2. authentication (auth.py): refused requests get a 401 problem and never
   reach routing, so unknown paths cannot be probed either;
3. the body: JSON only (415), at most ``max_body`` octets (413), whether
   announced by Content-Length or found while reading a chunked body;
4. ``Cache-Control: no-store`` on every answer (the directory is personal
   data);
5. one log line per request: the action the handler named, its outcome,
   the HTTP status, the actor, the patient's pseudonym and, for a bulk, the
   counts.  Never the URL (it holds the INS), an address or a name.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request

from mssante.admin import problems
from mssante.admin.auth import Authenticator, Caller
from mssante.admin.problems import Kind

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("mssante.admin")

STATE_KEY = "admin"  # the request's ASGI state: its ActionRecord
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{7,63}")
_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})


@dataclass
class ActionRecord:
    """What the log line of one request says; handlers fill in their part."""

    correlation_id: str
    action: str  # named by the route (api.py); "http.<method>" until then
    actor: str | None = None
    outcome: str | None = None
    patient: str | None = None  # pseudonym (pseudonym.py), never the INS
    count: int | None = None
    counts: dict[str, int] = field(default_factory=dict)


def record_of(request: Request) -> ActionRecord:
    record = request.scope["state"][STATE_KEY]
    assert isinstance(record, ActionRecord)
    return record


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


class AdminGate:
    def __init__(self, app: ASGIApp, *, auth: Authenticator, max_body: int) -> None:
        self.app = app
        self.auth = auth
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        record = ActionRecord(
            correlation_id=given if _REQUEST_ID.fullmatch(given) else secrets.token_hex(16),
            action=f"http.{scope['method'].lower()}",
        )
        state = scope.setdefault("state", {})
        state[STATE_KEY] = record
        status = 500  # if the application dies before answering

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", record.correlation_id.encode()),
                    (b"cache-control", b"no-store"),
                ]
            await send(message)

        try:
            refusal = self._refusal(scope, headers, state, record)
            if refusal is not None:
                await refusal(scope, receive, send_with_headers)
            else:
                await self.app(scope, self._limited(receive), send_with_headers)
        finally:
            _log_action(record, status, started)

    def _refusal(
        self,
        scope: Scope,
        headers: dict[str, str],
        state: MutableMapping[str, Any],
        record: ActionRecord,
    ) -> ASGIApp | None:
        checked = self.auth.check(headers, state)
        if not isinstance(checked, Caller):
            record.action, record.outcome = "authenticate", "refused"
            return problems.response(checked.kind, headers=checked.headers)
        record.actor = checked.actor
        if scope["method"] not in _WITH_BODY:
            return None
        if not _is_json(headers.get("content-type", "")):
            record.outcome = "refused"
            return problems.response(
                Kind.UNSUPPORTED_MEDIA_TYPE, "send Content-Type: application/json"
            )
        try:
            too_big = int(headers.get("content-length", "0")) > self.max_body
        except ValueError:
            too_big = True
        if too_big:
            record.outcome = "refused"
            return problems.response(Kind.BODY_TOO_LARGE, f"at most {self.max_body} octets")
        return None

    def _limited(self, receive: Receive) -> Receive:
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    # FastAPI lets an HTTPException from reading the body through to
                    # the application's handler, which answers it as a problem.
                    raise HTTPException(413, f"at most {self.max_body} octets")
            return message

        return limited_receive


def _log_action(record: ActionRecord, status: int, started: float) -> None:
    outcome = record.outcome or ("ok" if status < 400 else "error" if status >= 500 else "refused")
    fields: dict[str, Any] = {
        "event": "admin.action",
        "correlation_id": record.correlation_id,
        "action": record.action,
        "outcome": outcome,
        "status": status,
        "actor": record.actor,
        "patient": record.patient,
        "count": record.count,
        "counts": record.counts or None,
        "duration_ms": round((time.monotonic() - started) * 1000, 1),
    }
    fields = {k: v for k, v in fields.items() if v is not None}
    log.info("admin action %s: %s (%d)", record.action, outcome, status, extra={"fields": fields})
