"""DNS look-ups for DKIM keys, through dnspython's asyncio resolver.

Injected where used (STYLE.md 10): tests give a StaticResolver instead.
"""

from __future__ import annotations

import dns.asyncresolver
import dns.exception
import dns.resolver

from mssante.dkim import DnsTempError


class DnsTxtResolver:
    def __init__(self, lifetime: float = 5.0) -> None:
        self._resolver = dns.asyncresolver.Resolver()
        self._lifetime = lifetime

    async def __call__(self, name: str) -> str | None:
        try:
            answer = await self._resolver.resolve(name, "TXT", lifetime=self._lifetime)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            raise DnsTempError(str(exc)) from exc
        # RFC 6376 3.6.2.2: the strings of one record, joined.
        record = answer[0]
        return b"".join(record.strings).decode("ascii", "replace")
