"""Who is calling the admin API: a client certificate, a bearer token, or both.

- **Mutual TLS** (``admin.client_ca``): the TLS handshake requires a
  certificate issued by those CAs, so a client without one never reaches
  HTTP.  server.py puts the verified certificate's subject common name in
  the request's state (:data:`CLIENT_CN`).
- **Bearer tokens** (``admin.tokens_file``, RFC 6750): the file holds the
  SHA-256 (hex) of each accepted token, one a line; a copy of the file does
  not give a token.  It is read again when it changes, so a token is added
  or revoked without a restart.  Every line is compared in constant time
  and none is skipped, so timing tells nothing of which came close.

With both configured both are required.  The actor recorded in the audit
trail is ``admin:<certificate CN>``, ``admin:token-<12 hex of its hash>``,
or both joined by ``/``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mssante.admin.problems import Kind

log = logging.getLogger("mssante.admin")

# Key of the request's ASGI state where server.py puts the client certificate's CN.
CLIENT_CN = "admin_client_cn"
REALM = 'Bearer realm="mssante-admin"'
_HASH_LINE = re.compile(r"[0-9a-f]{64}")
# RFC 6750 2.1: b64token.
_BEARER = re.compile(r"Bearer +([A-Za-z0-9\-._~+/]+=*)", re.IGNORECASE)
_ACTOR_MAX = 200


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenFile:
    """The accepted tokens' hashes, as the file says now.

    Raises OSError at construction if the file cannot be read: the server
    does not start with no way in (an empty file is fine: no token yet).  A
    file that disappears or becomes unreadable later accepts nobody (and
    says so in the log).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._version: tuple[int, int, int] | None = None
        self._hashes: tuple[bytes, ...] = ()
        try:
            self._load(self._stat())
        except (OSError, UnicodeDecodeError) as exc:
            raise OSError(
                f"admin.tokens_file = {str(path)!r} cannot be read ({exc}): make it with"
                " `mssante admin new-token`, or unset admin.tokens_file"
            ) from exc

    def _stat(self) -> tuple[int, int, int]:
        stat = self.path.stat()
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    def _load(self, version: tuple[int, int, int]) -> None:
        hashes = []
        for number, line in enumerate(self.path.read_text(encoding="ascii").splitlines(), 1):
            line = line.strip().lower()
            if not line or line.startswith("#"):
                continue
            if _HASH_LINE.fullmatch(line):
                hashes.append(line.encode())
            else:
                log.warning(
                    "admin.tokens_file %s line %d: not a SHA-256 hex; ignored", self.path, number
                )
        self._hashes = tuple(hashes)
        self._version = version

    def _current(self) -> tuple[bytes, ...]:
        try:
            version = self._stat()
            if version != self._version:
                self._load(version)
        except (OSError, UnicodeDecodeError) as exc:
            if self._version is not None:
                log.error("admin.tokens_file %s unreadable (%s): no token accepted", self.path, exc)
            self._version = None
            self._hashes = ()
        return self._hashes

    def match(self, token: str) -> str | None:
        """The hash of ``token`` if the file lists it."""
        digest = token_hash(token).encode()
        found = False
        for line in self._current():
            found |= hmac.compare_digest(line, digest)
        return digest.decode() if found else None


@dataclass(frozen=True, slots=True)
class Caller:
    actor: str


@dataclass(frozen=True, slots=True)
class Denied:
    kind: Kind
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Authenticator:
    tokens: TokenFile | None
    certificate: bool  # mutual TLS: the handshake checked a certificate

    def check(self, headers: Mapping[str, str], state: Mapping[str, Any]) -> Caller | Denied:
        """``headers`` lower-case names; ``state`` the request's ASGI state."""
        names = []
        if self.certificate:
            cn = state.get(CLIENT_CN)
            if not isinstance(cn, str):
                # Not over this server's mutual TLS: refused, never let through.
                return Denied(Kind.UNAUTHENTICATED, {})
            names.append(_printable(cn))
        if self.tokens is not None:
            found = _BEARER.fullmatch(headers.get("authorization", "").strip())
            if found is None:
                return Denied(Kind.UNAUTHENTICATED, {"WWW-Authenticate": REALM})
            digest = self.tokens.match(found.group(1))
            if digest is None:
                return Denied(
                    Kind.INVALID_TOKEN, {"WWW-Authenticate": f'{REALM}, error="invalid_token"'}
                )
            names.append(f"token-{digest[:12]}")
        return Caller("admin:" + "/".join(names))


def _printable(text: str) -> str:
    # The CN lands in the audit trail and the logs: one line, bounded.
    return "".join(c if c.isprintable() else "?" for c in text)[:_ACTOR_MAX] or "?"
