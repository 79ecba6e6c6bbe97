"""HTTP security headers and request size limits, for every webmail response.

A pure ASGI middleware (no BaseHTTPMiddleware: it would buffer streaming
downloads).  The Content-Security-Policy allows no script at all: the
webmail works without JavaScript (issue 8.1), so even HTML that slipped
past the sanitiser could not run.  Pages are never cached (health data on
shared computers).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'none'",
        "style-src 'self'",
        "img-src 'self'",
        "font-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "object-src 'none'",
    ]
)

HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    # same-origin, not no-referrer: under no-referrer browsers send "Origin: null" with
    # our own form POSTs (Fetch, "append a request Origin header"), which the CSRF
    # check refuses; other sites still get no Referer.
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=(), interest-cohort=()"),
]
HSTS = (b"strict-transport-security", b"max-age=31536000; includeSubDomains")
NO_STORE = (b"cache-control", b"no-store")
# Static files (the style sheet) may be cached: they carry no personal data.
STATIC_PREFIX = "/static/"


class SecurityHeaders:
    def __init__(self, app: ASGIApp, *, hsts: bool, max_body: int) -> None:
        self.app = app
        self.hsts = hsts
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_body
                except ValueError:
                    too_big = True
                if too_big:
                    await _too_large(send, self._extra(scope))
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLargeError
            return message

        extra = self._extra(scope)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                # A response's own header wins (an attachment's sandbox CSP).
                message["headers"] = headers + [(k, v) for k, v in extra if k not in present]
            await send(message)

        # A body found too large while the handler reads it raises
        # BodyTooLargeError, which the application answers (413 page, app.py).
        await self.app(scope, limited_receive, send_with_headers)

    def _extra(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        extra = list(HEADERS)
        if not scope["path"].startswith(STATIC_PREFIX):
            extra.insert(0, NO_STORE)
        if self.hsts:
            extra.append(HSTS)
        return extra


class BodyTooLargeError(Exception):
    pass


async def _too_large(send: Send, extra: list[tuple[bytes, bytes]]) -> None:
    body = "La taille de l'envoi dépasse la limite autorisée.".encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
