"""Bounces of notification e-mails: a small SMTP listener for the VERP addresses.

Patients' mail providers send delivery status notifications (RFC 3464,
inside an RFC 6522 ``multipart/report``) to the return path of our e-mail,
``bounce+<token>-<mac>@<bounce domain>`` (verp.py).  This listener, on its
own port behind the bounce domain's MX, accepts RCPT only for a return path
whose MAC verifies (``550 5.1.1`` for anything else: replies.py), asks for
no client certificate (the providers are outside the trust space), and
reads the report:

- a permanent failure (``Action: failed`` with a ``Status`` of class 5,
  RFC 3464 2.3.3, RFC 3463 2) marks the person's e-mail address invalid
  (``Patient.email_invalid``: the planner chooses postal from then on), and
  the notifications that e-mail carried are handed to the postal channel,
  since their recipient was never told; an audit event records it, with
  no health data (status code and notification ids only);
- anything else (``delayed``, ``4.x.x``, an auto-reply) is accepted and
  ignored, so a provider never retries it and nobody gets backscatter.

The DATA phase is the gateway's own (smtp/protocol.py, smtp/data.py:
framing, bare LF refusal, size limit); only the policy here differs.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from dataclasses import dataclass, field
from datetime import datetime
from email import message_from_bytes, policy
from email.message import Message as EmailMessage
from email.parser import BytesHeaderParser
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from mssante.clock import Clock
from mssante.metrics import ListenerMetrics
from mssante.notify.verp import VerpCodec
from mssante.smtp import replies
from mssante.smtp.protocol import GatewayProtocol
from mssante.smtp.replies import Reply
from mssante.store import audit
from mssante.store.models import Channel, Notification, NotificationStatus, Patient
from mssante.store.writer import Writer

log = logging.getLogger("mssante.notify.bounces")

ACTOR = "bounce-listener"
# A DSN is small; some return the whole original (ours is a few KB).
MAX_REPORT_SIZE = 2_000_000
MAX_RECIPIENTS = 10
_STATUS = re.compile(r"([245])\.\d{1,3}\.\d{1,3}")


# --- reading a report -----------------------------------------------------------------


def _status_blocks(part: EmailMessage) -> list[EmailMessage]:
    """The per-message and per-recipient field blocks of a delivery-status part."""
    payload = part.get_payload()
    if isinstance(payload, list):  # the email package parsed message/delivery-status
        return [p for p in payload if isinstance(p, EmailMessage)]
    raw = part.get_payload(decode=True)
    if not isinstance(raw, bytes):
        return []
    # RFC 6533 message/global-delivery-status: the same blocks, UTF-8 allowed.
    chunks = re.split(rb"\r?\n\r?\n", raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    parser = BytesHeaderParser(policy=policy.compat32)
    return [parser.parsebytes(c.strip() + b"\r\n") for c in chunks if c.strip()]


def permanent_failure(data: bytes) -> str | None:
    """The RFC 3463 status of a permanent failure this DSN reports, else None."""
    try:
        msg = message_from_bytes(data, policy=policy.compat32)
    except Exception:  # a broken report is a report we ignore
        return None
    # RFC 6522 3: the report is the top-level multipart/report.
    if msg.get_content_type() != "multipart/report":
        return None
    if str(msg.get_param("report-type", "")).lower() not in (
        "delivery-status",
        "global-delivery-status",
    ):
        return None
    for part in msg.get_payload():
        if not isinstance(part, EmailMessage):
            continue
        if part.get_content_type() not in (
            "message/delivery-status",
            "message/global-delivery-status",
        ):
            continue
        for block in _status_blocks(part)[1:]:  # RFC 3464 2.1: per-recipient blocks
            action = str(block.get("Action", "")).strip().lower()
            words = str(block.get("Status", "")).split()
            status = words[0] if words else ""
            if action == "failed" and _STATUS.fullmatch(status) and status.startswith("5"):
                return status
    return None


# --- what a permanent failure changes ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class BounceOutcome:
    recipient_id: int
    email_invalid: bool  # the flag was set now
    rerouted: list[int] = field(default_factory=list)  # notifications handed to postal


async def apply_permanent_bounce(
    session: AsyncSession, *, message_id: str, status: str, at: datetime
) -> BounceOutcome | None:
    """One writer job: the address of the e-mail ``message_id`` bounced for good."""
    rows = list(
        await session.scalars(
            select(Notification)
            .where(Notification.email_message_id == message_id)
            .order_by(Notification.id)
        )
    )
    if not rows:
        return None
    recipient = await session.get(Patient, rows[0].recipient_id)
    if recipient is None:
        return None
    address = (rows[0].email or "").lower()
    known = {(a or "").lower() for a in (recipient.activation_email, recipient.insurer_email)}
    # Only the address that bounced: a new address given since stays valid.
    invalidated = bool(address) and address in known and not recipient.email_invalid
    if invalidated:
        recipient.email_invalid = True
        recipient.updated_at = at
    rerouted = []
    for row in rows:
        if row.status is NotificationStatus.SENT and row.channel is Channel.EMAIL:
            # The person was never told: a postal statement will list it.
            row.channel = Channel.POSTAL
            row.status = NotificationStatus.PENDING
            row.sent_at = None
            row.next_attempt_at = at
            row.last_error = f"e-mail bounced ({status})"
            rerouted.append(row.id)
    if not invalidated and not rerouted:
        return BounceOutcome(recipient.id, False)  # a repeated report
    await audit.append(
        session,
        at=at,
        kind="notification.bounced",
        actor=ACTOR,
        patient_id=recipient.id,
        details={"status": status, "notifications": rerouted, "email_invalid": invalidated},
    )
    return BounceOutcome(recipient.id, invalidated, rerouted)


# --- the listener -----------------------------------------------------------------------


class _Report:
    """The DATA sink: a bounce is small and read into memory."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self._parts.append(bytes(data))
        self.size += len(data)

    def discard(self) -> None:
        self._parts.clear()

    def data(self) -> bytes:
        return b"".join(self._parts)


class BouncePolicy:
    """aiosmtpd hooks of the bounce listener (the protocol is the gateway's)."""

    def __init__(self, *, verp: VerpCodec, writer: Writer, clock: Clock) -> None:
        self._verp = verp
        self._writer = writer
        self._clock = clock
        self.reports = 0  # permanent failures applied (tests, logs)

    def new_spool(self) -> _Report:
        return _Report()

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        extra = [f"250-SIZE {MAX_REPORT_SIZE}", "250-PIPELINING", "250-ENHANCEDSTATUSCODES"]
        rest = [r for r in responses[1:] if not r[4:].upper().startswith("AUTH")]
        return [responses[0], *extra, *rest]

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        # RFC 3464 2: reports come from the null sender; any sender is taken.
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        envelope.tokens = []
        return str(replies.SENDER_OK)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        token = self._verp.token(address)
        if token is None:
            log.info("bounce RCPT refused: not one of our return paths")
            return str(replies.BOUNCE_ADDRESS_UNKNOWN)
        if len(envelope.tokens) >= MAX_RECIPIENTS:
            return str(replies.TOO_MANY_RECIPIENTS)
        envelope.rcpt_tos.append(address)
        envelope.tokens.append(token)
        return str(replies.RECIPIENT_OK)

    async def deliver(self, session: Any, envelope: Any, spool: _Report) -> Reply:
        status = permanent_failure(spool.data())
        if status is None:
            log.info("bounce report ignored: not a permanent failure")
            return replies.BOUNCE_RECEIVED
        at = self._clock.now()
        for token in envelope.tokens:
            message_id = self._verp.message_id(token)

            async def job(s: AsyncSession, message_id: str = message_id) -> BounceOutcome | None:
                return await apply_permanent_bounce(s, message_id=message_id, status=status, at=at)

            outcome = await self._writer.run(job)
            if outcome is not None:
                self.reports += 1
                log.info(
                    "notification bounced status=%s email_invalid=%s rerouted=%d",
                    status,
                    outcome.email_invalid,
                    len(outcome.rerouted),
                )
        return replies.BOUNCE_RECEIVED


class BounceListener:
    """The SMTP listener of the bounce domain: no AUTH, optional STARTTLS."""

    def __init__(
        self,
        policy: BouncePolicy,
        *,
        host: str,
        port: int,
        hostname: str,
        tls_context: ssl.SSLContext | None,
        metrics: ListenerMetrics,
        timeout: float = 60.0,
    ) -> None:
        self.policy = policy
        self._metrics = metrics
        self._host = host
        self._port = port
        self._hostname = hostname
        self._tls = tls_context
        self._timeout = timeout
        self._server: asyncio.Server | None = None

    def _protocol(self) -> GatewayProtocol:
        return GatewayProtocol(
            self.policy,
            max_message_size=MAX_REPORT_SIZE,
            max_header_size=256 * 1024,
            hostname=self._hostname,
            ident="mssante bounces",
            tls_context=self._tls,
            require_starttls=False,  # providers use opportunistic TLS (RFC 3207)
            timeout=self._timeout,
            loop=asyncio.get_running_loop(),
            auth_exclude_mechanism=["LOGIN", "PLAIN"],
            metrics=self._metrics,
        )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, self._host, self._port)

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
