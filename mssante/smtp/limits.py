"""Abuse limits: how fast a peer may send, and how often it may be wrong.

Pure logic, no I/O; time comes from an injected :class:`~mssante.clock.Clock`
(STYLE.md 10).  The session policy asks an :class:`AbuseGuard` for a
:class:`SessionGuard` when a session knows who its peer is, then asks it at
each step and gets a :class:`Decision` back (STYLE.md 3):

- ``MAIL``: :meth:`SessionGuard.check_message` -- messages per minute.
- ``RCPT``, *before* routing: :meth:`SessionGuard.check_recipient` --
  recipients per message, and the bad-recipient budgets.
- ``RCPT``, when routing refused the address (invalid, unknown, closed or
  opposed): :meth:`SessionGuard.record_bad_recipient`.

Limits are counted per *identity*, the strongest one the session has: the
peer certificate's subject DN, else the authenticated account, else the IP
address (an IPv6 peer counts as its /64, which one host usually holds
whole).  :func:`peer_identity` builds that string.

Why: the RCPT reply tells whether an INS has a mailbox here and whether the
patient opposed (DOMAIN.md 3), and INS keys can be computed (mod 97), so a
peer could try candidate addresses and harvest which ones exist.  Each
refused recipient therefore spends a budget -- per session and per rolling
24 hours -- and once the budget is spent **every** further RCPT of that
identity gets the same temporary ``450 4.7.1``, valid addresses included.
If valid recipients were still accepted, the difference between ``250`` and
``450`` would answer the very question the limit is there to refuse.
Legitimate senders lose little: a temporary refusal keeps the message in
their queue and they retry later (RFC 5321 4.2.5).

A session that goes on probing after that is closed with ``421``: each
refused recipient and each refusal by these limits is a strike, and the
strike that reaches :attr:`Limits.close_after_bad_in_session` gets ``421``
instead of its reply.  ``452 4.5.3`` for too many recipients is not a strike:
RFC 5321 4.5.3.1.10 expects well-behaved clients to meet it and send the
rest in another transaction.

Windows slide: an event counts for ``span`` seconds after it happened
(60 s for messages, 24 h for bad recipients), so there is no burst at a
window edge.  Each identity keeps only the times of its last N events (N the
limit): the limit is reached exactly when the oldest of them is still inside
the window.  See :class:`AbuseGuard` for the memory bound.
"""

from __future__ import annotations

import ipaddress
from array import array
from collections import OrderedDict
from dataclasses import dataclass, fields

from mssante.clock import Clock
from mssante.smtp.replies import (
    PROBING_CLOSED,
    TOO_MANY_BAD_RECIPIENTS,
    TOO_MANY_MESSAGES,
    TOO_MANY_RECIPIENTS,
    Reply,
)

MESSAGE_WINDOW = 60.0
"""Seconds during which an accepted MAIL counts towards messages_per_minute."""
BAD_RECIPIENT_WINDOW = 24 * 3600.0
"""Seconds during which a refused recipient counts towards bad_recipients_per_day.

A rolling 24 hours rather than the calendar day in Europe/Paris: no reset at
midnight that a prober could wait for, and no time zone to get wrong.
"""

IDENTITY_KINDS = ("cert:", "account:", "ip:")


@dataclass(frozen=True, slots=True)
class Limits:
    """What one identity may do; every count is at least 1."""

    messages_per_minute: int = 120
    """MAIL commands per identity in any 60 s.

    Two a second sustained: far above what one professional or hospital
    sends to patients, low enough that a flood is slowed at once.  Going
    over only delays mail (451 keeps it in the sender's queue).  But an
    operator's MTA relays many professionals behind one certificate, and
    all of MSSante sends MES some 300 million documents a year (DOMAIN.md
    7), peaking in working hours: check the largest operators' peak rate
    against this before production.
    """
    recipients_per_message: int = 100
    """RCPT accepted in one transaction.

    RFC 5321 4.5.3.1.8: a server MUST accept at least 100 recipients and
    refusing fewer is a violation, so do not set it lower in production
    (tests do).  A message to a patient names one or two (a guardian)
    anyway; harvesting is bounded by the bad-recipient budgets, not here.
    """
    bad_recipients_per_session: int = 5
    """Refused recipients one session may see answered truthfully.

    A real sender makes the odd typo or writes to a patient who opposed
    (about 2 %, DOMAIN.md 7); five in one session is already a pattern.
    """
    bad_recipients_per_day: int = 50
    """Refused recipients one identity may see answered in any 24 h.

    Bounds the harvest: a prober learns at most this many "no" per day.
    High enough for an operator that relays for many professionals.
    """
    close_after_bad_in_session: int = 10
    """Strikes (refused recipients + refusals by these limits) before 421.

    With the defaults: five truthful refusals, four ``450 4.7.1``, and the
    tenth strike closes the session.
    """
    tracked_identities: int = 10_000
    """Identities remembered at once; the least recently seen one is forgotten.

    Far more than the sending MTAs of the trust space.  Forgetting only
    matters under an attack from that many identities at once, where
    per-identity limits cannot hold anyway.
    """

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"limits: {field.name} must be an integer >= 1, not {value!r}")


@dataclass(frozen=True, slots=True)
class Decision:
    """What the session does next.

    ``reply is None``: go on (:attr:`ok`).  Otherwise answer ``reply``
    instead of the command's own reply; if ``closes_session`` is also set,
    close the connection after sending it.  ``reason`` is for the log only
    (STYLE.md 5).
    """

    reply: Reply | None = None
    closes_session: bool = False
    reason: str = ""

    def __post_init__(self) -> None:
        if self.closes_session and (self.reply is None or self.reply.code != 421):
            raise ValueError("a decision that closes the session answers 421")

    @property
    def ok(self) -> bool:
        return self.reply is None


ALLOW = Decision()


def refuse(reply: Reply, reason: str) -> Decision:
    return Decision(reply, closes_session=False, reason=reason)


def close(reason: str) -> Decision:
    return Decision(PROBING_CLOSED, closes_session=True, reason=reason)


def peer_identity(
    *, cert_subject: str | None = None, account: str | None = None, ip: str | None = None
) -> str:
    """The strongest identity available: certificate, then account, then IP.

    IPv6 addresses count per /64 (a host usually has the whole prefix, so
    per address would give it 2**64 budgets); IPv4-mapped IPv6 addresses
    count as the IPv4 address.  Raises ``ValueError`` when nothing is given
    or the IP address does not parse.
    """
    if cert_subject:
        return f"cert:{cert_subject}"
    if account:
        return f"account:{account.strip().lower()}"
    if ip:
        return f"ip:{_ip_group(ip)}"
    raise ValueError("no peer identity: need a certificate subject, an account or an IP address")


def _ip_group(text: str) -> str:
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
    return str(address)


class _Window:
    """Times of the last ``limit`` events, in a ring: enough to tell whether
    ``limit`` events fall within the last ``span`` seconds, and no more."""

    __slots__ = ("_limit", "_next", "_span", "_times")

    def __init__(self, limit: int, span: float) -> None:
        self._limit = limit
        self._span = span
        self._times: array[float] = array("d")  # grows to ``limit``, then wraps
        self._next = 0  # once full: the oldest entry, overwritten next

    def is_full(self, now: float) -> bool:
        if len(self._times) < self._limit:
            return False
        return now - self._times[self._next] < self._span

    def add(self, now: float) -> None:
        if len(self._times) < self._limit:
            self._times.append(now)
        else:
            self._times[self._next] = now
            self._next = (self._next + 1) % self._limit

    def count(self, now: float) -> int:
        """Events in the window (for tests and metrics)."""
        return sum(1 for t in self._times if now - t < self._span)


class _IdentityRecord:
    __slots__ = ("bad_recipients", "messages")

    def __init__(self, limits: Limits) -> None:
        self.messages = _Window(limits.messages_per_minute, MESSAGE_WINDOW)
        self.bad_recipients = _Window(limits.bad_recipients_per_day, BAD_RECIPIENT_WINDOW)


class AbuseGuard:
    """Counters of every identity, shared by all sessions; one per listener.

    Memory is bounded: at most ``limits.tracked_identities`` identities, the
    least recently seen forgotten first (LRU), each holding at most
    ``messages_per_minute + bad_recipients_per_day`` times of 8 octets
    (170 with the defaults: under 2 KB, so under 20 MB for 10 000
    identities at their limits).  A session keeps working when its identity
    is forgotten; its next call starts the identity afresh.

    Time is the clock's, made non-decreasing: a step back of the system
    clock neither resets the windows nor blocks a peer until the clock has
    caught up; a step forward counts as time gone by.

    Not thread-safe: call it from the event loop only.  Each call decides
    and counts at once, so concurrent sessions of one identity cannot both
    pass a check that only one of them should.
    """

    def __init__(self, limits: Limits, clock: Clock) -> None:
        self.limits = limits
        self._clock = clock
        self._records: OrderedDict[str, _IdentityRecord] = OrderedDict()
        self._last_wall: float | None = None
        self._now = 0.0  # seconds, non-decreasing

    def session(self, identity: str) -> SessionGuard:
        """Per-session limits for ``identity`` (see :func:`peer_identity`)."""
        if not identity.startswith(IDENTITY_KINDS) or identity.endswith(":"):
            raise ValueError(f"identity must be cert:, account: or ip:<value>, not {identity!r}")
        return SessionGuard(self, identity)

    def __len__(self) -> int:
        """Identities tracked now."""
        return len(self._records)

    def __contains__(self, identity: object) -> bool:
        return identity in self._records

    def messages_in_window(self, identity: str) -> int:
        record = self._records.get(identity)
        return record.messages.count(self._tick()) if record else 0

    def bad_recipients_in_window(self, identity: str) -> int:
        record = self._records.get(identity)
        return record.bad_recipients.count(self._tick()) if record else 0

    def _tick(self) -> float:
        wall = self._clock.now().timestamp()
        if self._last_wall is not None:
            self._now += max(0.0, wall - self._last_wall)
        self._last_wall = wall
        return self._now

    def _record(self, identity: str) -> _IdentityRecord:
        record = self._records.get(identity)
        if record is not None:
            self._records.move_to_end(identity)
            return record
        record = self._records[identity] = _IdentityRecord(self.limits)
        while len(self._records) > self.limits.tracked_identities:
            self._records.popitem(last=False)
        return record


class SessionGuard:
    """The limits as one SMTP session meets them; see the module docstring.

    Once a decision has closed the session, every later call answers the
    same ``421`` again.
    """

    def __init__(self, guard: AbuseGuard, identity: str) -> None:
        self._guard = guard
        self._limits = guard.limits
        self.identity = identity
        self.bad_recipients = 0
        """Recipients refused by routing in this session."""
        self.strikes = 0
        """Refused recipients plus refusals by these limits (452 apart)."""
        self._closed: Decision | None = None

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def check_message(self) -> Decision:
        """At MAIL: one more message within the minute?

        An allowed MAIL counts at once, whether or not the transaction ends
        in a stored message: aborted transactions cost the same work and a
        prober's MAIL/RCPT/RSET loops must count.  Counting here rather than
        after delivery also keeps concurrent sessions from all passing.
        """
        if self._closed is not None:
            return self._closed
        now = self._guard._tick()
        record = self._guard._record(self.identity)
        if record.messages.is_full(now):
            return self._strike(
                TOO_MANY_MESSAGES,
                f"{self.identity}: over {self._limits.messages_per_minute} messages per minute",
            )
        record.messages.add(now)
        return ALLOW

    def check_recipient(self, count_so_far: int) -> Decision:
        """At RCPT, before routing; ``count_so_far``: recipients accepted in
        this transaction so far.

        Over a bad-recipient budget, the address is refused whatever it is
        (450 4.7.1, a strike): routing must not run, so a valid and an
        invalid address get the same reply.
        """
        if self._closed is not None:
            return self._closed
        now = self._guard._tick()
        record = self._guard._record(self.identity)
        if self.bad_recipients >= self._limits.bad_recipients_per_session:
            return self._strike(
                TOO_MANY_BAD_RECIPIENTS,
                f"{self.identity}: over {self._limits.bad_recipients_per_session}"
                " refused recipients in this session",
            )
        if record.bad_recipients.is_full(now):
            return self._strike(
                TOO_MANY_BAD_RECIPIENTS,
                f"{self.identity}: over {self._limits.bad_recipients_per_day}"
                " refused recipients in 24 hours",
            )
        if count_so_far >= self._limits.recipients_per_message:
            # RFC 5321 4.5.3.1.10: not a strike, the client sends the rest later.
            return refuse(
                TOO_MANY_RECIPIENTS,
                f"{self.identity}: over {self._limits.recipients_per_message}"
                " recipients in one message",
            )
        return ALLOW

    def record_bad_recipient(self) -> Decision:
        """Routing refused a recipient (invalid, unknown, closed, opposed).

        :data:`ALLOW`: send routing's refusal as it is.  A closing decision:
        send its 421 instead and close -- the prober does not learn the
        answer to the address that used its last strike.
        """
        if self._closed is not None:
            return self._closed
        now = self._guard._tick()
        self._guard._record(self.identity).bad_recipients.add(now)
        self.bad_recipients += 1
        self.strikes += 1
        if self.strikes >= self._limits.close_after_bad_in_session:
            return self._close()
        return ALLOW

    def _strike(self, reply: Reply, reason: str) -> Decision:
        self.strikes += 1
        if self.strikes >= self._limits.close_after_bad_in_session:
            return self._close()
        return refuse(reply, reason)

    def _close(self) -> Decision:
        self._closed = close(f"{self.identity}: {self.strikes} strikes in this session, closing")
        return self._closed
