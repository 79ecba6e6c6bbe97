"""Session policy: EHLO keywords, MAIL, RCPT and the hand-off to the store.

aiosmtpd calls the ``handle_*`` hooks; replies come from replies.py.
Recipients are decided by routing (a verdict per RCPT); accepted ones are
remembered on the envelope with their patient id.

Bounce mode (``smtp.refusal = "dsn"``, issue #7): a recipient refused for a
patient cause (adresse invalide 5.1.3, patient non trouve 5.1.1, messagerie
fermee 5.2.1) is answered 250 and reported to the sender in a DSN queued
with the message (outbound/dsn.py, store/mailstore.py) -- but only when
such a DSN will go out: with a null sender (never bounce a bounce) or a
NOTIFY without FAILURE, the refusal stays at RCPT, so no refusal is ever
silently swallowed.  Everything else (relay, trust space, limits, a
non-ASCII address) is refused at RCPT in both modes.  The abuse guard
counts a bounced recipient exactly as a refused one, and it is audited the
same way: DSN mode tells a prober nothing faster than RCPT mode.

RFC 3461 parameters (dsn_parameters.py) are kept on the envelope:
``NOTIFY=SUCCESS`` on an accepted recipient adds a "delivered" entry to
the same DSN.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Literal, Protocol, TypeVar

from cryptography import x509

from mssante.clock import Clock
from mssante.metrics import ListenerMetrics, Metrics
from mssante.outbound.dsn import Action, DeliveryReport, RecipientReport
from mssante.pseudonym import Pseudonymizer
from mssante.routing.recipient import RecipientRouter, split_address
from mssante.routing.trust import DnKey, TrustSpace, dn_key
from mssante.routing.verdict import Refuse
from mssante.smtp import dsn_parameters, replies
from mssante.smtp.dsn_parameters import MailDsn, RcptDsn
from mssante.smtp.limits import AbuseGuard, SessionGuard, peer_identity
from mssante.smtp.protocol import GatewayProtocol, new_log_id
from mssante.smtp.replies import Reply
from mssante.smtp.trace import received_header
from mssante.smtp.transaction import Transaction
from mssante.store.blobs import Spool
from mssante.store.inbox import Recipient
from mssante.store.mailstore import DkimPolicyError, Envelope, StorageFullError

log = logging.getLogger("mssante.smtp")


# Stores a received message, returns once it is durable.
Deliverer = Callable[[Envelope, Spool], Awaitable[object]]


class RefusalRecorder(Protocol):
    async def __call__(
        self,
        *,
        at: datetime,
        sender: str,
        peer: str | None,
        cause: str,
        patient_id: int | None,
        correlation: str | None = None,
    ) -> None: ...


SpoolFactory = Callable[[], Spool]
_Dsn = TypeVar("_Dsn", MailDsn, RcptDsn)

# Refusal causes (routing/recipient.py) that bounce mode reports by DSN:
# the patient's own situation, DOMAIN.md 3.
BOUNCED_CAUSES = frozenset({"invalid_address", "patient_not_found", "mailbox_closed"})
# Causes for which the local part is a valid INS: logged as its pseudonym.
_VALID_INS_CAUSES = frozenset({"patient_not_found", "mailbox_closed"})
_UNSET: Any = object()


class Policy:
    LISTENER = "mx"  # the listener label of metrics and transaction logs

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
        refusal: Literal["rcpt", "dsn"] = "rcpt",
        metrics: ListenerMetrics | None = None,
    ) -> None:
        self.metrics = metrics or Metrics().listener(self.LISTENER)
        self._refusal = refusal
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
        grow_for_dsn_parameters(server)
        extra = [
            f"250-SIZE {self._max_size}",
            "250-PIPELINING",  # RFC 2920
            "250-ENHANCEDSTATUSCODES",  # RFC 2034
            "250-DSN",  # RFC 3461
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
        txn = self._transaction(server)
        txn.mail_domain = address.rpartition("@")[2].lower() or None
        txn.identity = self._log_identity(session)
        reply = await self._mail(server, session, envelope, address, mail_options, txn)
        if not reply.is_success:
            self.mail_refused(txn, reply)
        return str(reply)

    def mail_refused(self, txn: Transaction, reply: Reply) -> None:
        txn.mail_refusal = reply
        self.metrics.refused("mail", reply.name)

    async def _mail(
        self,
        server: GatewayProtocol,
        session: Any,
        envelope: Any,
        address: str,
        mail_options: list[str],
        txn: Transaction,
    ) -> Reply:
        # RFC 6531 3.5: a non-ASCII address needs SMTPUTF8 on MAIL.
        smtputf8 = "SMTPUTF8" in mail_options
        if not address.isascii() and not smtputf8:
            return replies.NON_ASCII_WITHOUT_SMTPUTF8
        for option in mail_options:
            name, _, value = option.partition("=")
            if name == "SIZE":
                if not value.isdigit():
                    return replies.BAD_SIZE_PARAMETER
                if int(value) > self._max_size:
                    # RFC 1870 6.1: refuse at once, before any data is sent.
                    return replies.SIZE_DECLARED_TOO_BIG.format(limit=self._max_size)
        dsn = parse_parameters(server, mail_options, dsn_parameters.parse_mail)
        if isinstance(dsn, Reply):
            return dsn
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
                    correlation=txn.correlation_id,
                )
                return refusal.reply
        decision = self._guard(session).check_message()
        if not decision.ok:
            log.info("MAIL limited: %s", decision.reason)
            assert decision.reply is not None  # not ok: a reply
            return decision.reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        envelope.accepted = []
        envelope.dsn = dsn
        # The message's ref: the 250 quotes it, the audit trail and the
        # transaction's log line carry it (transaction.py).
        envelope.ref = txn.correlation_id
        # RFC 3464 per-recipient entries: refusals to report (bounce mode)
        # and deliveries to confirm (NOTIFY=SUCCESS).
        envelope.bounced = []
        envelope.confirm = []
        return replies.SENDER_OK

    def _transaction(self, server: GatewayProtocol) -> Transaction:
        """The transaction the protocol opened at MAIL (transaction.py)."""
        txn = server.transaction
        if txn is None:
            txn = server.transaction = Transaction(self.metrics.name)
        return txn

    def _log_identity(self, session: Any) -> str | None:
        """Who the peer proved to be, for the logs: its certificate's subject
        (an operator: never a patient).  Once per session."""
        found = getattr(session, "log_identity", _UNSET)
        if found is _UNSET:
            cert = peer_certificate(session)
            found = session.log_identity = cert.subject.rfc4514_string() if cert else None
        identity: str | None = found
        return identity

    async def handle_RCPT(
        self,
        server: GatewayProtocol,
        session: Any,
        envelope: Any,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        txn = self._transaction(server)
        if not address.isascii() and not envelope.smtp_utf8:
            return self._rcpt_refused(txn, replies.NON_ASCII_WITHOUT_SMTPUTF8)
        dsn = parse_parameters(server, rcpt_options, dsn_parameters.parse_rcpt)
        if isinstance(dsn, Reply):
            return self._rcpt_refused(txn, dsn)
        guard = self._guard(session)
        # Before routing: once a peer is over its budget every RCPT gets the
        # same answer, so the replies tell nothing about which INS exist.
        # Bounced recipients were answered 250 too: they count (RFC 5321
        # 4.5.3.1.8, 100 recipients).
        decision = guard.check_recipient(len(envelope.accepted) + len(envelope.bounced))
        if not decision.ok:
            log.info("RCPT limited: %s", decision.reason)
            assert decision.reply is not None  # not ok: a reply
            return self._rcpt_refused(txn, decision.reply)
        verdict = await self._router.route(address)
        if isinstance(verdict, Refuse):
            log.info("RCPT refused %s: %s", verdict.reply.enhanced, verdict.reason)
            if verdict.cause in _VALID_INS_CAUSES and (parts := split_address(address)):
                txn.refused_recipients.append(self._pseudonym(parts[0].upper()))
            strike = guard.record_bad_recipient()
            await self._record_refusal(
                at=self._clock.now(),
                sender=envelope.mail_from or "",
                peer=peer_ip(session),
                cause=verdict.cause,
                patient_id=verdict.patient_id,
                correlation=txn.correlation_id,
            )
            if not strike.ok:
                log.info("closing probing session: %s", strike.reason)
                assert strike.reply is not None  # not ok: a reply
                return self._rcpt_refused(txn, strike.reply)
            # Counted as refused in bounce mode too (answered 250, reported by DSN).
            self._rcpt_refused(txn, verdict.reply)
            if self._bounces(envelope, address, verdict, dsn):
                # DATA needs a recipient: this one is in rcpt_tos, not accepted.
                envelope.rcpt_tos.append(address)
                envelope.rcpt_options.extend(rcpt_options)
                envelope.bounced.append(
                    RecipientReport(
                        final_recipient=address,
                        action=Action.FAILED,
                        status=verdict.reply.enhanced,
                        original=dsn.orcpt,
                        cause=verdict.cause,
                        diagnostic=str(verdict.reply),
                    )
                )
                log.info("RCPT refusal %s to be reported by DSN", verdict.reply.enhanced)
                return str(replies.RECIPIENT_OK)
            return str(verdict.reply)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        envelope.accepted.append(Recipient(address, verdict.patient_id))
        if dsn.wants_success and not is_null_sender(envelope.mail_from):
            envelope.confirm.append(
                RecipientReport(
                    final_recipient=address,
                    action=Action.DELIVERED,
                    status="2.0.0",
                    original=dsn.orcpt,
                )
            )
        pseudonym = self._pseudonym(verdict.ins)
        txn.recipients.append(pseudonym)
        log.info("RCPT accepted ins=%s status=%s", pseudonym, verdict.status.value)
        return str(replies.RECIPIENT_OK)

    def _rcpt_refused(self, txn: Transaction, reply: Reply) -> str:
        txn.refusals.append(reply.name)
        self.metrics.refused("rcpt", reply.name)
        return str(reply)

    def _bounces(self, envelope: Any, address: str, verdict: Refuse, dsn: RcptDsn) -> bool:
        """Bounce mode: accept this refused recipient and report it by DSN?

        Only for a patient cause, and only when a DSN will really be sent
        (RFC 3461 4.1 NOTIFY, RFC 5321 4.5.5 null sender): otherwise the
        RCPT refusal is the only way the sender learns of it.  A non-ASCII
        address (SMTPUTF8) stays refused: reporting it would need RFC 6533
        (message/global-delivery-status).
        """
        return (
            self._refusal == "dsn"
            and verdict.cause in BOUNCED_CAUSES
            and address.isascii()
            and not is_null_sender(envelope.mail_from)
            and dsn.wants_failure
        )

    def _report(self, envelope: Any, helo: str | None, at: datetime) -> DeliveryReport | None:
        """The DSN for this transaction, if anything is to be reported."""
        reported = [*envelope.bounced, *envelope.confirm]
        if not reported:
            return None
        mail: MailDsn = envelope.dsn
        return DeliveryReport(
            to=envelope.mail_from,
            from_address=f"MAILER-DAEMON@{self._hostname}",
            message_id=f"<{secrets.token_hex(12)}.dsn@{self._hostname}>",
            date=at,
            reporting_mta=self._hostname,
            arrival_date=at,
            recipients=tuple(reported),
            envelope_id=mail.envid,
            received_from_mta=helo,
        )

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
        ref: str = envelope.ref  # the transaction's correlation id (handle_MAIL)
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
            report=self._report(envelope, helo, at),
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
        if env.report is not None:
            log.info(
                "DSN queued ref=%s failed=%d delivered=%d",
                ref,
                len(env.report.failed),
                len(env.report.delivered),
            )
        if not env.recipients:
            # Bounce mode, every recipient refused: the 250 means the DSN is queued.
            return replies.REPORT_QUEUED.format(ref=ref)
        log.info("stored ref=%s recipients=%d size=%d", ref, len(env.recipients), spool.size)
        return replies.MESSAGE_STORED.format(ref=ref)


def is_null_sender(mail_from: str | None) -> bool:
    """RFC 5321 4.5.5: ``MAIL FROM:<>`` (aiosmtpd gives ``<>``)."""
    return mail_from in (None, "", "<>")


def grow_for_dsn_parameters(server: Any) -> None:
    """RFC 3461 parameters lengthen MAIL and RCPT lines (RFC 5321 4.5.3.1.4)."""
    server.command_size_limits["MAIL"] += dsn_parameters.MAIL_LINE_GROWTH
    server.command_size_limits["RCPT"] += dsn_parameters.RCPT_LINE_GROWTH


def parse_parameters(
    server: Any, options: list[str], parse: Callable[[list[str]], _Dsn | Reply]
) -> _Dsn | Reply:
    """RFC 3461 parameters of the current MAIL or RCPT, from the arguments as sent."""
    if not any(o.partition("=")[0] in dsn_parameters.DSN_PARAMETERS for o in options):
        return parse([])
    sent = dsn_parameters.as_sent(getattr(server, "arguments_as_sent", ""), options)
    if sent is None:
        return replies.PARAMETER_SYNTAX
    return parse(sent)


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
