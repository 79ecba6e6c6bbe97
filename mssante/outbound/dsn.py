"""Delivery status notifications we send (RFC 3464), as pure functions.

A :class:`DeliveryReport` (the envelope and what happened to each reported
recipient) becomes the bytes of one ``multipart/report;
report-type=delivery-status`` message (RFC 6522), CRLF, 7-bit:

1. the human-readable part, French then English, with the cause for each
   recipient in the words Mon espace santé uses (DOMAIN.md 3: *messagerie
   fermée*, *patient non trouvé*, *adresse invalide*), under the subject
   "Message non distribué";
2. ``message/delivery-status``: Original-Envelope-Id (the ENVID), Reporting-MTA,
   Received-From-MTA, Arrival-Date, then per recipient Original-Recipient
   (only when ORCPT was given: RFC 3464 2.3.1), Final-Recipient, Action,
   Status and, for a failure, Diagnostic-Code (the SMTP reply rcpt mode
   would have sent);
3. ``text/rfc822-headers``: the header section of the message, never its body.

Headers only, even with ``RET=FULL`` (our choice): RFC 3461 4.3 says the full
message SHOULD come back then, but the body may carry health information
about a patient (one who opposed the service, for a *messagerie fermée*), and
the gateway does not copy content out of the store; the sender has it
anyway.  Mon espace santé returns the headers too.

The delivery worker sends it from the null reverse-path (RFC 3461 6.2,
RFC 5321 4.5.5) and applies DKIM; nothing here depends on the database.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from email import policy as email_policy
from email.message import EmailMessage, MIMEPart
from email.utils import format_datetime

# Parts are encoded with RFC 5322 CRLF, 76-column quoted-printable and
# RFC 2047 encoded words where needed.
_POLICY = email_policy.SMTP
# The message is generated folding only past RFC 5322's 998 octets:
# delivery-status fields are ASCII by construction (RFC 3461 4.2, 4.4: printable
# US-ASCII values) and must never become encoded words, which 78-column
# folding makes of a long word such as a 500-character ORCPT.  Every field we
# write is far shorter than 998.
_GENERATE = email_policy.SMTP.clone(max_line_length=998)

SUBJECT_FAILED = "Message non distribué"
SUBJECT_DELIVERED = "Message distribué"


class Action(enum.StrEnum):
    """RFC 3464 2.3.3 (the actions this gateway reports)."""

    FAILED = "failed"
    DELIVERED = "delivered"


@dataclass(frozen=True, slots=True)
class OriginalRecipient:
    """RFC 3461 4.2 ORCPT, decoded from xtext: ``rfc822;<address>``."""

    addr_type: str
    address: str


@dataclass(frozen=True, slots=True)
class RecipientReport:
    """One recipient's fate.

    ``cause`` is the routing cause of a failure (``mailbox_closed``,
    ``patient_not_found``, ``invalid_address``); ``diagnostic`` the SMTP
    reply (``550 5.1.1 ...``) that RCPT would have carried.
    """

    final_recipient: str
    action: Action
    status: str
    original: OriginalRecipient | None = None
    cause: str | None = None
    diagnostic: str | None = None


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """Everything a DSN says, for one received SMTP transaction."""

    to: str  # the envelope sender of the received message
    from_address: str
    message_id: str  # "<...@...>"
    date: datetime
    reporting_mta: str
    arrival_date: datetime
    recipients: tuple[RecipientReport, ...]
    envelope_id: str | None = None  # RFC 3461 ENVID, decoded
    received_from_mta: str | None = None  # the client's EHLO name

    @property
    def failed(self) -> tuple[RecipientReport, ...]:
        return tuple(r for r in self.recipients if r.action is Action.FAILED)

    @property
    def delivered(self) -> tuple[RecipientReport, ...]:
        return tuple(r for r in self.recipients if r.action is Action.DELIVERED)


# DOMAIN.md 3: the causes as Mon espace santé words them, then in English.
CAUSES: dict[str, tuple[str, str]] = {
    "mailbox_closed": (
        "messagerie fermée (le patient a fermé ou refusé sa messagerie de santé)",
        "mailbox closed (the patient closed or refused the health messaging service)",
    ),
    "patient_not_found": (
        "patient non trouvé (aucune messagerie de santé pour cet INS)",
        "patient not found (no patient mailbox for this INS)",
    ),
    "invalid_address": (
        "adresse invalide (la partie locale n'est pas un INS valide)",
        "invalid address (the local part is not a valid INS)",
    ),
}
_UNKNOWN_CAUSE = ("non distribué", "not delivered")


def _cause(report: RecipientReport) -> tuple[str, str]:
    return CAUSES.get(report.cause or "", _UNKNOWN_CAUSE)


def human_text(report: DeliveryReport) -> str:
    """Part 1: French first, then English; no content of the message."""
    fr: list[str] = ["Bonjour,", ""]
    en: list[str] = ["Hello,", ""]
    if report.failed:
        fr += [
            "Votre message n'a pas pu être distribué au(x) destinataire(s) suivant(s) :",
            "",
        ]
        en += ["Your message could not be delivered to the following recipient(s):", ""]
        for r in report.failed:
            cause_fr, cause_en = _cause(r)
            fr.append(f"  <{r.final_recipient}> : {cause_fr}")
            en.append(f"  <{r.final_recipient}>: {cause_en}")
        fr += ["", "Ce destinataire ne recevra pas le message ; il n'est pas nécessaire de"]
        fr += ["le renvoyer à la même adresse.", ""]
        en += ["", "It will not receive the message; sending it again to the same address"]
        en += ["will not help.", ""]
    if report.delivered:
        fr += ["Votre message a été distribué dans la messagerie de :", ""]
        en += ["Your message was delivered to the mailbox of:", ""]
        fr += [f"  <{r.final_recipient}>" for r in report.delivered]
        en += [f"  <{r.final_recipient}>" for r in report.delivered]
        fr.append("")
        en.append("")
    fr += [
        "Les en-têtes de votre message sont joints (pas son contenu).",
        "Ce message est automatique, merci de ne pas y répondre.",
    ]
    en += [
        "The headers of your message are attached (not its content).",
        "This is an automatic message; please do not reply.",
    ]
    return "\n".join([*fr, "", "-" * 20, "", *en]) + "\n"


def _block(fields: list[tuple[str, str]]) -> MIMEPart:
    part = MIMEPart(policy=_GENERATE)
    for name, value in fields:
        part[name] = value
    return part


def status_blocks(report: DeliveryReport) -> list[MIMEPart]:
    """Part 2: the per-message block, then one block per recipient (RFC 3464 2.1)."""
    message: list[tuple[str, str]] = []
    if report.envelope_id is not None:
        message.append(("Original-Envelope-Id", report.envelope_id))
    message.append(("Reporting-MTA", f"dns; {report.reporting_mta}"))
    if report.received_from_mta:
        message.append(("Received-From-MTA", f"dns; {report.received_from_mta}"))
    message.append(("Arrival-Date", format_datetime(report.arrival_date)))
    blocks = [_block(message)]
    for r in report.recipients:
        fields: list[tuple[str, str]] = []
        if r.original is not None:
            fields.append(("Original-Recipient", f"{r.original.addr_type};{r.original.address}"))
        fields += [
            ("Final-Recipient", f"rfc822;{r.final_recipient}"),
            ("Action", r.action.value),
            ("Status", r.status),
        ]
        if r.diagnostic is not None:
            fields.append(("Diagnostic-Code", f"smtp; {r.diagnostic}"))
        blocks.append(_block(fields))
    return blocks


def compose(report: DeliveryReport, *, headers: bytes) -> bytes:
    """The DSN's bytes: CRLF line ends, 7-bit, ready for the outbound queue.

    ``headers`` is the received header section (our trace header first); it
    is attached as text/rfc822-headers, 7bit when ASCII, quoted-printable
    otherwise (so the DSN never needs 8BITMIME).
    """
    msg = EmailMessage(policy=_POLICY)
    msg["From"] = f"Messagerie de santé <{report.from_address}>"
    msg["To"] = f"<{report.to}>"
    msg["Subject"] = SUBJECT_FAILED if report.failed else SUBJECT_DELIVERED
    msg["Date"] = format_datetime(report.date)
    msg["Message-ID"] = report.message_id
    # RFC 3834 5: a DSN is an automatic reply; nobody should answer it.
    msg["Auto-Submitted"] = "auto-replied"
    msg["MIME-Version"] = "1.0"
    msg["Content-Type"] = "multipart/report; report-type=delivery-status"
    msg.set_boundary("=_" + report.message_id.strip("<>").partition("@")[0] + "_report")

    text = MIMEPart(policy=_POLICY)
    text.set_content(human_text(report), charset="utf-8", cte="quoted-printable")
    text["Content-Language"] = "fr, en"

    status = MIMEPart(policy=_POLICY)
    status["Content-Type"] = "message/delivery-status"
    status.set_payload(status_blocks(report))  # type: ignore[arg-type]

    original = MIMEPart(policy=_POLICY)
    ascii_only = headers.isascii()
    original.set_content(
        headers.rstrip(b"\r\n").decode("utf-8", "replace") + "\n",
        subtype="rfc822-headers",
        charset="us-ascii" if ascii_only else "utf-8",
        cte="7bit" if ascii_only else "quoted-printable",
    )
    msg.set_payload([text, status, original])
    return msg.as_bytes(policy=_GENERATE)
