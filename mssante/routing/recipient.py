"""RCPT-time decision for one recipient (DOMAIN.md 2 and 3).

Order of checks, each with its own reply:
1. the domain must be the patient domain          -> 550 5.7.1 relay refused
2. the local part must be a valid INS (key, ...)  -> 550 5.1.3 adresse invalide
3. the INS must be in the directory               -> 550 5.1.1 patient non trouve
4. the profile must be activated or created       -> 550 5.2.1 messagerie fermee
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mssante.routing.ins import InsError, parse_ins
from mssante.routing.verdict import Deliver, Refuse, Verdict
from mssante.smtp import replies
from mssante.store.models import ProfileStatus


@dataclass(frozen=True, slots=True)
class DirectoryEntry:
    patient_id: int
    status: ProfileStatus


# INS -> entry, or None when unknown.  Injected: the store provides it.
Lookup = Callable[[str], Awaitable[DirectoryEntry | None]]


def split_address(address: str) -> tuple[str, str] | None:
    """``local@domain`` -> (local, lower-case domain); None without an ``@``."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return None
    return local, domain.lower()


class RecipientRouter:
    def __init__(self, patient_domain: str, lookup: Lookup) -> None:
        self._domain = patient_domain.lower()
        self._lookup = lookup

    async def route(self, address: str) -> Verdict:
        parts = split_address(address)
        # RFC 5321 3.6 / never an open relay: only the patient domain, exactly
        # (no trailing dot, no source route, no percent hack: those fail here
        # or in the INS check below).
        if parts is None or parts[1] != self._domain:
            return Refuse(
                replies.RELAY_DENIED.format(domain=self._domain),
                # The domain only: the local part may be an INS (no identity in logs).
                f"relay: domain not served: {parts[1] if parts else 'none'!r}",
                "relay_denied",
            )
        local, _ = parts
        ins = parse_ins(local)
        if isinstance(ins, InsError):
            return Refuse(
                replies.INVALID_ADDRESS.format(why=_INS_WHY[ins.problem.value]),
                f"invalid INS ({ins.problem.value}: {ins.detail})",
                "invalid_address",
            )
        entry = await self._lookup(ins.value)
        if entry is None:
            return Refuse(replies.PATIENT_NOT_FOUND, "INS not in directory", "patient_not_found")
        if not entry.status.accepts_mail:
            # DOMAIN.md 3: opposed or closed -> the professional gets an error.
            return Refuse(
                replies.MAILBOX_CLOSED,
                f"profile {entry.status.value}",
                "mailbox_closed",
                entry.patient_id,
            )
        return Deliver(entry.patient_id, ins.value, entry.status)


# Short French causes for the 5.1.3 reply (ASCII, see replies.py).
_INS_WHY = {
    "length": "15 caracteres attendus",
    "characters": "caracteres non autorises",
    "sex": "premier chiffre invalide",
    "month": "mois de naissance invalide",
    "department": "departement invalide",
    "key": "cle de controle incorrecte",
}
