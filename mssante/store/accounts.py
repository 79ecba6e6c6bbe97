"""Professional accounts: creation, authentication, sender rights.

Passwords are hashed with argon2id (RFC 9106; argon2-cffi's defaults, its
"low memory" profile of 64 MiB, 3 passes).  Hashing and verifying take tens
of milliseconds of CPU, so they run in a worker thread, never on the event
loop.  Unknown accounts cost a dummy verification too, so timing does not
tell which addresses exist.
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import datetime

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from mssante.store import audit
from mssante.store.db import SessionMaker
from mssante.store.models import Account

_hasher = PasswordHasher()
_DUMMY_HASH = _hasher.hash("mssante: no such account")


def certificate_fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


async def hash_password(password: str) -> str:
    return await asyncio.to_thread(_hasher.hash, password)


def _verify(stored: str | None, password: str) -> bool:
    try:
        return _hasher.verify(stored or _DUMMY_HASH, password) and stored is not None
    except (VerificationError, InvalidHashError):
        return False


async def add_account(
    session: AsyncSession,
    *,
    address: str,
    at: datetime,
    actor: str,
    password_hash: str | None = None,
    certificate_sha256: str | None = None,
    aliases: list[str] | None = None,
    display_name: str | None = None,
) -> Account:
    if password_hash is None and certificate_sha256 is None:
        raise ValueError("an account needs a password or a client certificate")
    account = Account(
        address=address.lower(),
        aliases=sorted({a.lower() for a in aliases or []}),
        display_name=display_name,
        password_hash=password_hash,
        certificate_sha256=certificate_sha256,
        created_at=at,
        disabled_at=None,
    )
    session.add(account)
    await session.flush()
    await audit.append(
        session,
        at=at,
        kind="account.created",
        actor=actor,
        details={
            "account": account.address,
            "password": password_hash is not None,
            "certificate": certificate_sha256 is not None,
        },
    )
    return account


async def disable_account(
    session: AsyncSession, address: str, *, at: datetime, actor: str
) -> Account:
    account = await session.scalar(select(Account).where(Account.address == address.lower()))
    if account is None:
        raise LookupError(f"no account {address}")
    if account.disabled_at is None:
        account.disabled_at = at
        await audit.append(
            session,
            at=at,
            kind="account.disabled",
            actor=actor,
            details={"account": account.address},
        )
    return account


class Accounts:
    """Authentication for the submission listener (read sessions only)."""

    def __init__(self, sessions: SessionMaker) -> None:
        self._sessions = sessions

    async def by_password(self, address: str, password: str) -> Account | None:
        async with self._sessions() as session:
            account = await session.scalar(
                select(Account).where(Account.address == address.lower())
            )
        stored = account.password_hash if account and account.disabled_at is None else None
        if not await asyncio.to_thread(_verify, stored, password):
            return None
        return account

    async def by_certificate(self, der: bytes) -> Account | None:
        async with self._sessions() as session:
            account = await session.scalar(
                select(Account).where(
                    Account.certificate_sha256 == certificate_fingerprint(der),
                    Account.disabled_at.is_(None),
                )
            )
        return account
