"""Per-notification return paths (VERP) that authenticate their bounces.

Each notification e-mail gets a random token.  It names the e-mail
(``Message-ID: <token@domain>``, kept in ``notifications.email_message_id``)
and its envelope sender, ``bounce+<token>-<mac>@<bounce domain>``, where
``mac`` is an HMAC-SHA256 of the token under a secret key.  A delivery
status notification comes back to that address (RFC 5321 4.5.5, RFC 3464),
so the bounce listener knows which e-mail failed without trusting anything
the report says; an address whose MAC does not verify is refused at RCPT,
so forged bounces cannot switch a patient's notifications to postal.

Tokens and MACs are lower-case hex: some relays fold local parts to lower
case (RFC 5321 2.4 allows a server to, for its own mailboxes).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from mssante.durable import write_file

_CONTEXT = b"mssante/verp/v1\x00"
_MAC_HEX = 20  # 80 bits: a forger needs ~2^80 tries per token
_LOCAL = re.compile(r"bounce\+([0-9a-f]{24})-([0-9a-f]{20})")


@dataclass(frozen=True, slots=True)
class ReturnPath:
    token: str
    envelope_from: str  # bounce+<token>-<mac>@<bounce domain>
    message_id: str  # <token@message id domain>


class VerpCodec:
    def __init__(self, key: bytes, *, bounce_domain: str, message_id_domain: str) -> None:
        if len(key) < 16:
            raise ValueError("VERP key shorter than 16 octets")
        self._key = key
        self.bounce_domain = bounce_domain.lower()
        self.message_id_domain = message_id_domain.lower()

    def _mac(self, token: str) -> str:
        return hmac.new(self._key, _CONTEXT + token.encode(), hashlib.sha256).hexdigest()[:_MAC_HEX]

    def new(self) -> ReturnPath:
        token = secrets.token_hex(12)
        return ReturnPath(
            token=token,
            envelope_from=f"bounce+{token}-{self._mac(token)}@{self.bounce_domain}",
            message_id=self.message_id(token),
        )

    def message_id(self, token: str) -> str:
        return f"<{token}@{self.message_id_domain}>"

    def token(self, address: str) -> str | None:
        """The token of a genuine return path of ours, else None."""
        local, at, domain = address.strip().lower().rpartition("@")
        if not at or domain.rstrip(".") != self.bounce_domain:
            return None
        match = _LOCAL.fullmatch(local)
        if match is None:
            return None
        token, mac = match.groups()
        return token if hmac.compare_digest(mac, self._mac(token)) else None


def load_key(secret: str | None, key_file: Path) -> bytes:
    """The configured secret, else a random key kept in ``key_file`` (made once)."""
    if secret:
        return hashlib.sha256(b"mssante/verp-secret\x00" + secret.encode()).digest()
    if not key_file.exists():
        key_file.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # another process made it first
            write_file(key_file, secrets.token_bytes(32), exclusive=True)
    return key_file.read_bytes()
