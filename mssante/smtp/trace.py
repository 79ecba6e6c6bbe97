"""The trace header we add (RFC 5321 4.4), kept beside the received bytes."""

from __future__ import annotations

from datetime import datetime
from email.utils import format_datetime


def _clean(text: str) -> str:
    # Client-supplied (HELO): keep it printable and on one line.
    return "".join(c if 33 <= ord(c) < 127 else "?" for c in text)[:255]


def received_header(
    *,
    helo: str | None,
    peer: str | None,
    hostname: str,
    tls: str | None,
    ref: str,
    at: datetime,
) -> bytes:
    # RFC 3848: ESMTPS when the session is under TLS.
    with_ = "ESMTPS" if tls else "ESMTP"
    tls_note = f" ({tls})" if tls else ""
    line = (
        f"Received: from {_clean(helo or 'unknown')} ([{_clean(peer or 'unknown')}])\r\n"
        f"\tby {hostname} (mssante) with {with_}{tls_note} id {ref};\r\n"
        f"\t{format_datetime(at)}\r\n"
    )
    return line.encode("ascii")
