"""The one error type that carries an SMTP reply (STYLE.md 5).

The client sees ``reply``; the log sees ``reason``, which may name internal
details the client must never read.
"""

from __future__ import annotations

from mssante.smtp.replies import Reply


class SmtpError(Exception):
    def __init__(self, reply: Reply, reason: str) -> None:
        super().__init__(reason)
        self.reply = reply
        self.reason = reason
