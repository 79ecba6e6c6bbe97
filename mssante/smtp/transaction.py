"""One SMTP transaction as the operator sees it: one log line when it ends.

A transaction starts at ``MAIL`` (RFC 5321 3.3) and ends with the reply to
the message data (accepted or refused at DATA or BDAT), a refused ``MAIL``,
or ``RSET``, ``QUIT``, ``EHLO``/``HELO``, ``STARTTLS`` or the end of the
connection before the data were answered.  The protocol (protocol.py)
opens and ends it; the policy (session.py) fills in what it decided.

The line (event ``smtp.transaction``, logger ``mssante.smtp``) carries the
correlation id, which is the message's ``ref``: the ``250`` reply quotes
it, ``message.delivered`` audit events have it as ``details.ref`` and
``message.refused`` events (refused senders and recipients) as
``details.correlation``.  Recipients appear as INS pseudonyms
(pseudonym.py); the sender as its domain only; never a subject, a body, a
file name or an INS.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from mssante.smtp.replies import Reply

log = logging.getLogger("mssante.smtp")

EVENT = "smtp.transaction"


def new_correlation_id() -> str:
    """The message reference: 80 random bits (``Policy.deliver`` stores it as ``ref``)."""
    return secrets.token_hex(10)


@dataclass(slots=True)
class Transaction:
    listener: str
    correlation_id: str = field(default_factory=new_correlation_id)
    started: float = field(default_factory=time.monotonic)
    mail_domain: str | None = None
    # Who the peer proved to be: certificate subject (operator) or account id.
    identity: str | None = None
    recipients: list[str] = field(default_factory=list)  # accepted, as pseudonyms
    refusals: list[str] = field(default_factory=list)  # refused RCPT, by reply name
    refused_recipients: list[str] = field(default_factory=list)  # pseudonyms, when an INS
    mail_refusal: Reply | None = None  # set by the policy when MAIL is refused
    size: int | None = None

    def end(self, session: Any, reply: Reply | None, ended_by: str) -> None:
        """Write the transaction's log line."""
        ssl_object = session.ssl.get("ssl_object") if isinstance(session.ssl, dict) else None
        fields = {
            "event": EVENT,
            "correlation_id": self.correlation_id,
            "listener": self.listener,
            "peer_ip": session.peer[0] if session.peer else None,
            "tls": ssl_object.version() if ssl_object is not None else None,
            "identity": self.identity,
            "mail_from_domain": self.mail_domain,
            "rcpt_accepted": len(self.recipients),
            "rcpt_refused": len(self.refusals),
            "refusals": self.refusals,
            "recipients": self.recipients,
            "refused_recipients": self.refused_recipients,
            "size": self.size,
            "code": reply.code if reply is not None else None,
            "enhanced": reply.enhanced if reply is not None else None,
            "reply": reply.name if reply is not None else None,
            "ended_by": ended_by,
            "duration_ms": round((time.monotonic() - self.started) * 1000, 1),
        }
        log.info(EVENT, extra={"fields": fields})
