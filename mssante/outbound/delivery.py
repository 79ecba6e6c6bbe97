"""Delivering one message to the recipients of one domain, inside the trust space.

:meth:`OperatorDelivery.deliver` is one attempt; it never raises for a
remote problem but returns one :class:`RecipientResult` per recipient
(decisions are values, STYLE.md 3).  In order:

1. **Whitelist** (DOMAIN.md 6, issue 7): the recipient domain must be
   listed in the whitelist (``TrustSpace.operators``), exactly.  The
   ``.mssante.fr`` suffix alone is *not* enough: the suffix is a hint used to
   recognise MSSanté addresses (Reply-To contacts), but only a listed domain
   has an operator whose certificate we can check, and the issue says
   "mail never leaves the trust space".  An unlisted domain fails
   permanently before any DNS look-up or connection.
2. **Next hop** from the injected resolver (routes.py).
3. **STARTTLS required** (RFC 3207): a server that does not offer it, or a
   handshake that fails, is a temporary failure of that host; nothing is
   ever sent in clear text.  The server certificate must chain to the trust
   anchors (IGC-Santé, never the system store), match the host name we
   connected to, not be revoked (configured CRLs) and, with
   ``outbound.verify_operator_dn``, its subject must be the
   ``DNCertificatOperateur`` listed for the domain.  Our client certificate
   is presented (mutual TLS).
4. **DKIM**: the message is signed for the patient domain.
5. **Transaction**: MAIL, one RCPT per recipient (each has its own
   reply), DATA.  RFC 5321 4.2.1: a 4yz reply is transient, a 5yz one
   permanent; a connection, TLS or timeout problem is transient.  Hosts are
   tried in preference order while the problem is the connection itself;
   once a host answered MAIL, its replies decide.

``detail`` keeps the remote reply (code and text, truncated) or our own
reason, never message content: it becomes ``last_error``.
"""

from __future__ import annotations

import enum
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
from cryptography import x509

from mssante.dkim import DkimSigner
from mssante.outbound.routes import NextHop, NextHopResolver, RouteError
from mssante.routing.trust import TrustSpace, dn_key
from mssante.smtp.tls import client_context

log = logging.getLogger("mssante.outbound")

DETAIL_MAX = 300
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


class Outcome(enum.StrEnum):
    SENT = "sent"
    TEMPORARY = "temporary"  # try again later
    PERMANENT = "permanent"  # never: ends the recipient


@dataclass(frozen=True, slots=True)
class RecipientResult:
    address: str
    outcome: Outcome
    detail: str
    code: int | None = None


def _detail(text: str) -> str:
    return _CONTROL.sub(" ", text).strip()[:DETAIL_MAX]


def _reply(code: int, message: str) -> str:
    return _detail(f"{code} {message}")


def classify(code: int) -> Outcome:
    """RFC 5321 4.2.1: 5yz permanent, anything else not accepted is transient."""
    return Outcome.PERMANENT if 500 <= code < 600 else Outcome.TEMPORARY


class ClientTls:
    """Our client TLS context for operators, rebuilt when one of its files changes."""

    def __init__(
        self, *, anchors: Path, cert: Path, key: Path, crls: tuple[Path, ...] = ()
    ) -> None:
        self._files = (anchors, cert, key, *crls)
        self._anchors, self._cert, self._key, self._crls = anchors, cert, key, crls
        self._stamp: tuple[float, ...] = ()
        self._context: ssl.SSLContext | None = None

    def _mtimes(self) -> tuple[float, ...]:
        return tuple(p.stat().st_mtime if p.exists() else -1.0 for p in self._files)

    def __call__(self) -> ssl.SSLContext:
        stamp = self._mtimes()
        if self._context is None or stamp != self._stamp:
            # Hostname checking and CERT_REQUIRED are PROTOCOL_TLS_CLIENT's defaults.
            self._context = client_context(self._anchors, self._cert, self._key, crls=self._crls)
            self._stamp = stamp
        return self._context


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message to send: envelope sender, recipients, and how to read its bytes
    (not yet signed), called when its turn comes."""

    mail_from: str
    recipients: list[str]
    load: Callable[[], Awaitable[bytes]]


class _HostFailure(Exception):
    """This host cannot take the message now (connection, TLS, greeting): try the next."""


class OperatorDelivery:
    """One delivery attempt per call; the worker decides what results mean for the rows."""

    def __init__(
        self,
        *,
        trust: Callable[[], TrustSpace],
        routes: NextHopResolver,
        tls: Callable[[], ssl.SSLContext],
        signer: DkimSigner,
        local_hostname: str,
        timeout: float,
        verify_operator_dn: bool = True,
    ) -> None:
        self._trust = trust
        self._routes = routes
        self._tls = tls
        self._signer = signer
        self._local_hostname = local_hostname
        self._timeout = timeout
        self._verify_dn = verify_operator_dn
        self.connections = 0  # opened so far (benchmark)

    async def deliver(
        self, domain: str, mail_from: str, recipients: list[str], message: bytes
    ) -> list[RecipientResult]:
        """One message to ``recipients`` at ``domain``: one result per recipient."""

        async def load() -> bytes:
            return message

        (results,) = await self.deliver_many(domain, [Envelope(mail_from, recipients, load)])
        return results

    async def deliver_many(
        self, domain: str, envelopes: list[Envelope]
    ) -> list[list[RecipientResult]]:
        """Several messages to one domain, one transaction each on one connection
        (RFC 5321 3.3); the results of each, in order."""
        domain = domain.lower().rstrip(".")
        space = self._trust()
        listed = space.operators.get(domain)
        if listed is None or domain == space.patient_domain:
            # Issue 7: mail never leaves the trust space.  Checked first, so
            # an unlisted domain costs no DNS query and no connection.  Our
            # own domain is never a destination (nothing here loops back).
            text = (
                f"domain {domain} is the patient domain, not an operator's"
                if domain == space.patient_domain
                else f"domain {domain} not in the whitelist"
            )
            return [_all(e.recipients, Outcome.PERMANENT, text) for e in envelopes]
        try:
            hops = await self._routes.resolve(domain)
        except RouteError as exc:
            outcome = Outcome.PERMANENT if exc.permanent else Outcome.TEMPORARY
            return [_all(e.recipients, outcome, _detail(str(exc))) for e in envelopes]
        out: list[list[RecipientResult]] = []
        client: aiosmtplib.SMTP | None = None
        try:
            for envelope in envelopes:
                try:
                    message = await envelope.load()
                except Exception as exc:
                    # A missing blob or master key fails this message only
                    # (retried, then failed by age), never the others.
                    log.error("outbound message unreadable", exc_info=True)
                    text = _detail(f"message unreadable: {type(exc).__name__}")
                    out.append(_all(envelope.recipients, Outcome.TEMPORARY, text))
                    continue
                signed = await self._signer.sign(message) + message
                if client is None:
                    client, problem = await self._connect(hops, listed, domain)
                    if client is None:
                        # No host usable now: the rest waits for the next attempt.
                        out += [
                            _all(e.recipients, Outcome.TEMPORARY, problem)
                            for e in envelopes[len(out) :]
                        ]
                        break
                elif not await _reset(client):
                    # The connection did not survive the last transaction.
                    await _close(client)
                    client = None
                    out += [
                        _all(e.recipients, Outcome.TEMPORARY, "connection lost")
                        for e in envelopes[len(out) :]
                    ]
                    break
                out.append(
                    await self._transaction(client, envelope.mail_from, envelope.recipients, signed)
                )
        finally:
            if client is not None:
                await _close(client)
        return out

    async def _connect(
        self, hops: list[NextHop], listed: frozenset[tuple[str, str]], domain: str
    ) -> tuple[aiosmtplib.SMTP | None, str]:
        """The first host that passes every check, else None and why."""
        problems: list[str] = []
        for hop in hops:
            try:
                return await self._open(hop, listed if self._verify_dn else None), ""
            except _HostFailure as exc:
                log.warning("outbound: %s unusable for %s: %s", hop, domain, exc)
                problems.append(f"{hop}: {exc}")
        return None, _detail("; ".join(problems))

    async def _open(
        self, hop: NextHop, operator_dn: frozenset[tuple[str, str]] | None
    ) -> aiosmtplib.SMTP:
        client = aiosmtplib.SMTP(
            hostname=hop.host,
            port=hop.port,
            local_hostname=self._local_hostname,
            timeout=self._timeout,
            use_tls=False,
            start_tls=False,  # done explicitly below, so that it is never skipped
        )
        try:
            await client.connect()
            self.connections += 1
            await client.ehlo()
            if not client.supports_extension("starttls"):
                # RFC 3207 4: no STARTTLS offered; the trust space never
                # speaks in clear text, so this host is unusable for now.
                raise _HostFailure("STARTTLS not offered, not sent in clear text")
            await client.starttls(tls_context=self._tls(), server_hostname=hop.host)
            await client.ehlo()  # RFC 3207 4.2: forget what was said before TLS
            if operator_dn is not None:
                der = client.get_transport_info("ssl_object").getpeercert(binary_form=True)
                subject = x509.load_der_x509_certificate(der).subject
                if dn_key(subject) != operator_dn:
                    raise _HostFailure(
                        f"certificate {subject.rfc4514_string()} is not the listed operator's"
                    )
        except _HostFailure:
            client.close()
            raise
        except aiosmtplib.SMTPResponseException as exc:  # 421 greeting, 454 TLS unavailable
            client.close()
            raise _HostFailure(_reply(exc.code, exc.message)) from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            # ssl.SSLError is an OSError: unknown CA, wrong host name, revoked...
            client.close()
            raise _HostFailure(_detail(f"{type(exc).__name__}: {exc}")) from exc
        return client

    async def _transaction(
        self, client: aiosmtplib.SMTP, mail_from: str, recipients: list[str], message: bytes
    ) -> list[RecipientResult]:
        results: dict[str, RecipientResult] = {}
        accepted: list[str] = []
        try:
            options = [f"SIZE={len(message)}"] if client.supports_extension("size") else []
            if not message.isascii() and client.supports_extension("8bitmime"):
                options.append("BODY=8BITMIME")  # RFC 6152
            addresses = [mail_from, *recipients]
            if not all(a.isascii() for a in addresses) and client.supports_extension("smtputf8"):
                options.append("SMTPUTF8")  # RFC 6531
            try:
                await client.mail(mail_from, options=options)
            except aiosmtplib.SMTPResponseException as exc:
                return _all(recipients, classify(exc.code), _reply(exc.code, exc.message), exc.code)
            for rcpt in recipients:
                try:
                    await client.rcpt(rcpt)
                except aiosmtplib.SMTPResponseException as exc:
                    results[rcpt] = RecipientResult(
                        rcpt, classify(exc.code), _reply(exc.code, exc.message), exc.code
                    )
                else:
                    accepted.append(rcpt)
            if accepted:
                try:
                    response = await client.data(message)
                except aiosmtplib.SMTPResponseException as exc:
                    for rcpt in accepted:
                        results[rcpt] = RecipientResult(
                            rcpt, classify(exc.code), _reply(exc.code, exc.message), exc.code
                        )
                else:
                    for rcpt in accepted:
                        results[rcpt] = RecipientResult(
                            rcpt,
                            Outcome.SENT,
                            _reply(response.code, response.message),
                            response.code,
                        )
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            # Lost connection or timeout mid-transaction: whoever is not
            # decided yet is retried (RFC 5321 6.1 accepts a rare duplicate
            # rather than a lost message).
            text = _detail(f"{type(exc).__name__}: {exc}")
            for rcpt in recipients:
                results.setdefault(rcpt, RecipientResult(rcpt, Outcome.TEMPORARY, text))
        return [results[r] for r in recipients]


def _all(
    recipients: list[str], outcome: Outcome, detail: str, code: int | None = None
) -> list[RecipientResult]:
    return [RecipientResult(r, outcome, detail, code) for r in recipients]


async def _reset(client: aiosmtplib.SMTP) -> bool:
    """RSET between two transactions on one connection (RFC 5321 4.1.1.5); False if gone."""
    if not client.is_connected:
        return False
    try:
        await client.rset()
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        return False
    return True


async def _close(client: aiosmtplib.SMTP) -> None:
    if not client.is_connected:
        return
    try:
        await client.quit()
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        client.close()
