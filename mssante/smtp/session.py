"""Session policy: EHLO keywords, MAIL, RCPT and the hand-off to the store.

aiosmtpd calls the ``handle_*`` hooks; replies come from replies.py.
Recipients are decided by routing (a verdict per RCPT); accepted ones are
remembered on the envelope with their patient id.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol

from cryptography import x509

from mssante.clock import Clock
from mssante.pseudonym import Pseudonymizer
from mssante.routing.recipient import RecipientRouter
from mssante.routing.trust import DnKey, TrustSpace, dn_key
from mssante.routing.verdict import Refuse
from mssante.smtp import replies
from mssante.smtp.limits import AbuseGuard, SessionGuard, peer_identity
from mssante.smtp.protocol import GatewayProtocol, new_log_id
from mssante.smtp.replies import Reply
from mssante.smtp.trace import received_header
from mssante.store.blobs import Spool
from mssante.store.inbox import Recipient
from mssante.store.mailstore import DkimPolicyError, Envelope, StorageFullError

log = logging.getLogger("mssante.smtp")


# Stores a received message, returns once it is durable.
Deliverer = Callable[[Envelope, Spool], Awaitable[object]]


class RefusalRecorder(Protocol):
    async def __call__(
        self, *, at: datetime, sender: str, peer: str | None, cause: str, patient_id: int | None
    ) -> None: ...


SpoolFactory = Callable[[], Spool]


class Policy:
    def __init__(
        self,
        *,
        router: RecipientRouter,
        deliver: Deliverer,
        record_refusal: RefusalRecorder,
        new_spool: SpoolFactory,
        max_message_size: int,
        pseudonym: Pseudonymizer,
        hostname: str,
        clock: Clock,
        trust: Callable[[], TrustSpace],
        check_senders: bool,
        abuse: AbuseGuard,
    ) -> None:
        self._abuse = abuse
        self._trust = trust
        self._check_senders = check_senders
        self._hostname = hostname
        self._clock = clock
        self._router = router
        self._deliver = deliver
        self._record_refusal = record_refusal
        self.new_spool = new_spool
        self._max_size = max_message_size
        self._pseudonym = pseudonym

    async def handle_EHLO(
        self,
        server: GatewayProtocol,
        session: Any,
        envelope: Any,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        # RFC 1870 SIZE; the MAIL line may grow by " SIZE=nnnnnnnn".
        server.command_size_limits["MAIL"] += 26
        extra = [
            f"250-SIZE {self._max_size}",
            "250-PIPELINING",  # RFC 2920
            "250-ENHANCEDSTATUSCODES",  # RFC 2034
        ]
        # No AUTH here: operators authenticate by certificate; professional
        # clients use the submission listener.
        rest = [r for r in responses[1:] if not r[4:].upper().startswith("AUTH")]
        return [responses[0], *extra, *rest]

    async def handle_MAIL(
        self,
        server: GatewayProtocol,
        session: Any,
        envelope: Any,
        address: str,
        mail_options: list[str],
    ) -> str:
        # RFC 6531 3.5: a non-ASCII address needs SMTPUTF8 on MAIL.
        smtputf8 = "SMTPUTF8" in mail_options
        if not address.isascii() and not smtputf8:
            return str(replies.NON_ASCII_WITHOUT_SMTPUTF8)
        for option in mail_options:
            name, _, value = option.partition("=")
            if name == "SIZE":
                if not value.isdigit():
                    return str(replies.BAD_SIZE_PARAMETER)
                if int(value) > self._max_size:
                    # RFC 1870 6.1: refuse at once, before any data is sent.
                    return str(replies.SIZE_DECLARED_TOO_BIG.format(limit=self._max_size))
        if self._check_senders:
            refusal = self._trust().check_sender(address, peer_dn(session))
            if refusal is not None:
                log.info("MAIL refused %s: %s", refusal.reply.enhanced, refusal.reason)
                await self._record_refusal(
                    at=self._clock.now(),
                    sender=address,
                    peer=peer_ip(session),
                    cause=refusal.cause,
                    patient_id=None,
                )
                return str(refusal.reply)
        decision = self._guard(session).check_message()
        if not decision.ok:
            log.info("MAIL limited: %s", decision.reason)
            return str(decision.reply)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        envelope.accepted = []
        return str(replies.SENDER_OK)

    async def handle_RCPT(
        self,
        server: GatewayProtocol,
        session: Any,
        envelope: Any,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if not address.isascii() and not envelope.smtp_utf8:
            return str(replies.NON_ASCII_WITHOUT_SMTPUTF8)
        guard = self._guard(session)
        # Before routing: once a peer is over its budget every RCPT gets the
        # same answer, so the replies tell nothing about which INS exist.
        decision = guard.check_recipient(len(envelope.accepted))
        if not decision.ok:
            log.info("RCPT limited: %s", decision.reason)
            return str(decision.reply)
        verdict = await self._router.route(address)
        if isinstance(verdict, Refuse):
            log.info("RCPT refused %s: %s", verdict.reply.enhanced, verdict.reason)
            strike = guard.record_bad_recipient()
            await self._record_refusal(
                at=self._clock.now(),
                sender=envelope.mail_from or "",
                peer=peer_ip(session),
                cause=verdict.cause,
                patient_id=verdict.patient_id,
            )
            if not strike.ok:
                log.info("closing probing session: %s", strike.reason)
                return str(strike.reply)
            return str(verdict.reply)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        envelope.accepted.append(Recipient(address, verdict.patient_id))
        log.info(
            "RCPT accepted ins=%s status=%s", self._pseudonym(verdict.ins), verdict.status.value
        )
        return str(replies.RECIPIENT_OK)

    def _guard(self, session: Any) -> SessionGuard:
        """The session's abuse guard, by its strongest identity (made after STARTTLS,
        which starts a new aiosmtpd session)."""
        guard: SessionGuard | None = getattr(session, "abuse", None)
        if guard is None:
            guard = self._abuse.session(self._identity(session))
            session.abuse = guard
        return guard

    def _identity(self, session: Any) -> str:
        cert = peer_certificate(session)
        return peer_identity(
            cert_subject=cert.subject.rfc4514_string() if cert else None,
            ip=session.peer[0] if session.peer else "unknown",
        )

    async def deliver(self, session: Any, envelope: Any, spool: Spool) -> Reply:
        ref = secrets.token_hex(10)
        at = self._clock.now()
        tls = _tls_version(session)
        helo = session.host_name
        peer = peer_ip(session)
        env = Envelope(
            ref=ref,
            received_at=at,
            mail_from=envelope.mail_from,
            recipients=list(envelope.accepted),
            helo=helo,
            peer=peer,
            trace_header=received_header(
                helo=helo, peer=peer, hostname=self._hostname, tls=tls, ref=ref, at=at
            ),
        )
        try:
            await self._deliver(env, spool)
        except DkimPolicyError as exc:
            spool.discard()
            log.info("refused by DKIM policy for %s (temporary=%s)", exc.domain, exc.temporary)
            if exc.temporary:
                return replies.DKIM_TEMPORARY
            return replies.DKIM_REQUIRED.format(domain=exc.domain)
        except StorageFullError:
            spool.discard()
            log_id = new_log_id()
            log.error("storage full log_id=%s", log_id, exc_info=True)
            return replies.STORAGE_FULL.format(log_id=log_id)
        log.info("stored ref=%s recipients=%d size=%d", ref, len(env.recipients), spool.size)
        return replies.MESSAGE_STORED.format(ref=ref)


def peer_ip(session: Any) -> str | None:
    return session.peer[0] if session.peer else None


def peer_certificate(session: Any) -> x509.Certificate | None:
    """The client certificate, already verified during the handshake."""
    extra = session.ssl
    ssl_object = extra.get("ssl_object") if isinstance(extra, dict) else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return x509.load_der_x509_certificate(der) if der else None


def peer_dn(session: Any) -> DnKey | None:
    cert = peer_certificate(session)
    return dn_key(cert.subject) if cert else None


def _tls_version(session: Any) -> str | None:
    extra = session.ssl
    if not isinstance(extra, dict):
        return None
    ssl_object = extra.get("ssl_object")
    version: str | None = ssl_object.version() if ssl_object is not None else None
    return version
