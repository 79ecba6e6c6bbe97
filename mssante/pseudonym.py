"""Pseudonymous INS for logs: a keyed hash, so logs carry no identity.

The key lives in the data directory (created on first use, mode 0600); with
it an operator can find the log lines of one patient, without it the
pseudonym reveals nothing (an unkeyed hash of a 13-digit number with a known
layout would be reversed by brute force in minutes).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
from pathlib import Path

from mssante.durable import write_file


class Pseudonymizer:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def __call__(self, ins: str) -> str:
        digest = hmac.new(self._key, ins.encode(), hashlib.sha256).hexdigest()
        return f"p-{digest[:16]}"

    @classmethod
    def from_key_file(cls, path: Path) -> Pseudonymizer:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):  # another process made it first
                write_file(path, secrets.token_bytes(32), exclusive=True)
        return cls(path.read_bytes())
