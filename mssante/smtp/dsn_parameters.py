"""RFC 3461 DSN parameters: RET and ENVID on MAIL, NOTIFY and ORCPT on RCPT.

Pure parsing: a list of parameters as the client sent them (original case:
ENVID and ORCPT come back verbatim in the DSN) becomes a value, or the
reply refusing it (STYLE.md 3).  Malformed values get ``501 5.5.4``; a DSN
parameter on the wrong command is unknown there (``555 5.5.4``), like any
other parameter aiosmtpd does not know.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mssante.outbound.dsn import OriginalRecipient
from mssante.smtp import replies
from mssante.smtp.replies import Reply

MAIL_PARAMETERS = frozenset({"RET", "ENVID"})
RCPT_PARAMETERS = frozenset({"NOTIFY", "ORCPT"})
DSN_PARAMETERS = MAIL_PARAMETERS | RCPT_PARAMETERS

# RFC 3461 4.4: at most 100 characters; 4.2: ORCPT at most 500.
ENVID_MAX = 100
ORCPT_MAX = 500
# What the DSN parameters may add to a command line (RFC 5321 4.5.3.1.4:
# extensions lengthen it): " RET=HDRS ENVID=<100>", " NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=<500>".
MAIL_LINE_GROWTH = len(" RET=HDRS ENVID=") + ENVID_MAX
RCPT_LINE_GROWTH = len(" NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=") + ORCPT_MAX

# RFC 3461 4: xtext = *( xchar / hexchar ); xchar = "!".."~" except "+" and
# "="; hexchar = "+" two upper-case hex digits (lower case accepted: be liberal).
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-Fa-f]{2})*", re.ASCII)
_HEXCHAR = re.compile(r"\+([0-9A-Fa-f]{2})", re.ASCII)
# RFC 3461 4.2: addr-type = atom (RFC 5322 atext).
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+", re.ASCII)
_NOTIFY_KEYWORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})


def xtext_decode(value: str) -> str | None:
    """The decoded xtext, or None if malformed or not printable US-ASCII.

    RFC 3461 4.2 and 4.4: the decoded ENVID and ORCPT address consist of
    printable (graphic and space) US-ASCII only; a control character would
    let a client write lines into our DSNs.
    """
    if _XTEXT.fullmatch(value) is None:
        return None
    decoded = _HEXCHAR.sub(lambda m: chr(int(m[1], 16)), value)
    if not all(" " <= c <= "~" for c in decoded):
        return None
    return decoded


@dataclass(frozen=True, slots=True)
class MailDsn:
    """RET (``FULL``/``HDRS``, None if absent) and the decoded ENVID."""

    ret: str | None = None
    envid: str | None = None


@dataclass(frozen=True, slots=True)
class RcptDsn:
    """NOTIFY (None if absent; empty for NEVER) and ORCPT."""

    notify: frozenset[str] | None = None
    orcpt: OriginalRecipient | None = None

    @property
    def wants_failure(self) -> bool:
        # RFC 3461 4.1: without NOTIFY the MTA decides; failures are reported
        # (the usual "FAILURE" or "FAILURE,DELAY" default).
        return self.notify is None or "FAILURE" in self.notify

    @property
    def wants_success(self) -> bool:
        return self.notify is not None and "SUCCESS" in self.notify


def as_sent(arguments: str, options: list[str]) -> list[str] | None:
    """The parameters in ``options`` (aiosmtpd upper-cases them) as the client
    wrote them: the last words of the command's arguments.  None when they
    do not line up (a parameter glued to the address, ``<a@b>RET=FULL``)."""
    if not options:
        return []
    words = arguments.split()[-len(options) :]
    if len(words) != len(options) or any(
        w.upper() != o for w, o in zip(words, options, strict=True)
    ):
        return None
    return words


def _split(parameters: list[str], allowed: frozenset[str]) -> dict[str, str] | Reply:
    found: dict[str, str] = {}
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        name = name.upper()
        if name not in DSN_PARAMETERS:
            continue  # SIZE, BODY, SMTPUTF8: checked elsewhere
        if name not in allowed:
            return replies.PARAMETER_UNKNOWN
        if name in found:  # RFC 5321 4.1.1.11: each parameter once
            return replies.DSN_PARAMETER_INVALID.format(name=name)
        found[name] = value
    return found


def parse_mail(parameters: list[str]) -> MailDsn | Reply:
    """RET and ENVID (RFC 3461 4.3, 4.4) from MAIL's parameters, as sent."""
    found = _split(parameters, MAIL_PARAMETERS)
    if isinstance(found, Reply):
        return found
    ret = found.get("RET")
    if ret is not None:
        ret = ret.upper()
        if ret not in ("FULL", "HDRS"):
            return replies.DSN_PARAMETER_INVALID.format(name="RET")
    envid: str | None = None
    if "ENVID" in found:
        raw = found["ENVID"]
        envid = xtext_decode(raw) if 0 < len(raw) <= ENVID_MAX else None
        if envid is None:
            return replies.DSN_PARAMETER_INVALID.format(name="ENVID")
    return MailDsn(ret, envid)


def parse_rcpt(parameters: list[str]) -> RcptDsn | Reply:
    """NOTIFY and ORCPT (RFC 3461 4.1, 4.2) from RCPT's parameters, as sent."""
    found = _split(parameters, RCPT_PARAMETERS)
    if isinstance(found, Reply):
        return found
    notify: frozenset[str] | None = None
    if "NOTIFY" in found:
        words = found["NOTIFY"].upper().split(",")
        if words == ["NEVER"]:
            notify = frozenset()
        elif len(set(words)) == len(words) and set(words) <= _NOTIFY_KEYWORDS:
            notify = frozenset(words)
        else:
            return replies.DSN_PARAMETER_INVALID.format(name="NOTIFY")
    orcpt: OriginalRecipient | None = None
    if "ORCPT" in found:
        raw = found["ORCPT"]
        addr_type, semicolon, encoded = raw.partition(";")
        address = xtext_decode(encoded) if len(raw) <= ORCPT_MAX else None
        if not semicolon or _ATOM.fullmatch(addr_type) is None or not address:
            return replies.DSN_PARAMETER_INVALID.format(name="ORCPT")
        orcpt = OriginalRecipient(addr_type.lower(), address)
    return RcptDsn(notify, orcpt)
