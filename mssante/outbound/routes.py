"""Where mail for a domain goes next: the injected next-hop resolver (STYLE.md 10).

A :class:`NextHopResolver` turns a recipient domain into the hosts to try,
best first.  Two implementations:

- :class:`StaticRoutes`: a table ``domain -> "host:port"`` from the
  configuration (``outbound.routes``), for tests and private networks;
- :class:`MxResolver`: DNS MX records (RFC 5321 5.1), through an injected
  :class:`MxLookup` (:class:`DnsMxLookup` in production, a fake in tests).

A domain that cannot be routed raises :class:`RouteError`, temporary (DNS
timeout: try again later) or permanent (no such domain, null MX).  Whether
the domain may receive our mail at all is not decided here but in
delivery.py (the whitelist), before any look-up.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import dns.asyncresolver
import dns.exception
import dns.resolver

SMTP_PORT = 25


@dataclass(frozen=True, slots=True)
class NextHop:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class RouteError(Exception):
    """No next hop for a domain; ``permanent`` when asking again will not help."""

    def __init__(self, text: str, *, permanent: bool) -> None:
        super().__init__(text)
        self.permanent = permanent


class NextHopResolver(Protocol):
    async def resolve(self, domain: str) -> list[NextHop]:
        """The hosts to try for ``domain``, in preference order (never empty)."""
        ...


def parse_hop(text: str) -> NextHop:
    host, _, port = text.strip().rpartition(":")
    return NextHop(host.strip("[]"), int(port))


class StaticRoutes:
    """``outbound.routes``: a fixed next hop per domain; unlisted domains have none."""

    def __init__(self, table: Mapping[str, str]) -> None:
        self._table = {d.lower().rstrip("."): parse_hop(h) for d, h in table.items()}

    async def resolve(self, domain: str) -> list[NextHop]:
        hop = self._table.get(domain.lower().rstrip("."))
        if hop is None:
            # A private network's table is complete by construction: a
            # missing domain is a configuration fact, not a passing fault.
            raise RouteError(f"no route for {domain} in outbound.routes", permanent=True)
        return [hop]


# --- DNS MX ------------------------------------------------------------------------------


class NoSuchDomain(Exception):
    """NXDOMAIN: the domain does not exist."""


class NoMxRecords(Exception):
    """The domain exists but has no MX record (NOERROR, empty answer)."""


class DnsTemporary(Exception):
    """Timeout, SERVFAIL, no reachable name server."""


class MxLookup(Protocol):
    async def __call__(self, domain: str) -> list[tuple[int, str]]:
        """(preference, exchange) of the domain's MX records, exchange without the final dot
        ("" for the root, a null MX); raises NoSuchDomain, NoMxRecords or DnsTemporary."""
        ...


class DnsMxLookup:
    """dnspython's asyncio resolver."""

    def __init__(self, lifetime: float = 10.0) -> None:
        self._resolver = dns.asyncresolver.Resolver()
        self._lifetime = lifetime

    async def __call__(self, domain: str) -> list[tuple[int, str]]:
        try:
            answer = await self._resolver.resolve(domain, "MX", lifetime=self._lifetime)
        except dns.resolver.NXDOMAIN as exc:
            raise NoSuchDomain(str(exc)) from exc
        except dns.resolver.NoAnswer as exc:
            raise NoMxRecords(str(exc)) from exc
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            raise DnsTemporary(str(exc)) from exc
        return [
            (int(r.preference), r.exchange.to_text(omit_final_dot=True).rstrip(".")) for r in answer
        ]


class MxResolver:
    """Next hops from MX records (RFC 5321 5.1), on ``port`` (25)."""

    def __init__(
        self, lookup: MxLookup, *, rng: random.Random | None = None, port: int = SMTP_PORT
    ) -> None:
        self._lookup = lookup
        self._rng = rng or random.Random()  # noqa: S311 - load spreading, not a secret
        self._port = port

    async def resolve(self, domain: str) -> list[NextHop]:
        domain = domain.lower().rstrip(".")
        try:
            records = await self._lookup(domain)
        except NoMxRecords:
            # RFC 5321 5.1: no MX, the domain itself is the implicit MX.
            return [NextHop(domain, self._port)]
        except NoSuchDomain as exc:
            raise RouteError(f"{domain}: no such domain (NXDOMAIN)", permanent=True) from exc
        except DnsTemporary as exc:
            raise RouteError(f"{domain}: DNS lookup failed: {exc}", permanent=False) from exc
        if not records:
            return [NextHop(domain, self._port)]
        if any(exchange in ("", ".") for _, exchange in records):
            # RFC 7505 3: a null MX says the domain accepts no mail at all.
            raise RouteError(f"{domain}: null MX, the domain accepts no mail", permanent=True)
        # RFC 5321 5.1: lowest preference first; equal ones in random order.
        ordered = sorted(records, key=lambda r: (r[0], self._rng.random()))
        hops: list[NextHop] = []
        for _, exchange in ordered:
            hop = NextHop(exchange.lower(), self._port)
            if hop not in hops:
                hops.append(hop)
        return hops
