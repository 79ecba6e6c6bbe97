"""Abuse limits (mssante/smtp/limits.py): boundaries, windows, identities, probing.

Pure logic: a FakeClock moved by hand, no server, no sleeping.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mssante.smtp.limits import (
    ALLOW,
    PROBING_CLOSED,
    TOO_MANY_BAD_RECIPIENTS,
    TOO_MANY_MESSAGES,
    TOO_MANY_RECIPIENTS,
    AbuseGuard,
    Decision,
    Limits,
    SessionGuard,
    peer_identity,
)
from mssante.smtp.replies import Reply
from tests.conftest import FakeClock

IP = "ip:192.0.2.1"
OTHER_IP = "ip:192.0.2.2"
CERT = "cert:CN=mx.operateur.example,O=Operateur,C=FR"


def guard_with(clock: FakeClock, **limits: int) -> AbuseGuard:
    return AbuseGuard(Limits(**limits), clock)


def spend_bad(session: SessionGuard, n: int) -> None:
    """n recipients checked, then refused by routing, all answered truthfully."""
    for _ in range(n):
        assert session.check_recipient(0) is ALLOW
        assert session.record_bad_recipient() is ALLOW


# --- replies --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "code", "enhanced"),
    [
        (TOO_MANY_MESSAGES, 451, "4.7.0"),
        (TOO_MANY_RECIPIENTS, 452, "4.5.3"),
        (TOO_MANY_BAD_RECIPIENTS, 450, "4.7.1"),
        (PROBING_CLOSED, 421, "4.7.0"),
    ],
)
def test_replies_are_temporary_ascii_french_then_english(
    reply: Reply, code: int, enhanced: str
) -> None:
    assert (reply.code, reply.enhanced) == (code, enhanced)
    assert reply.is_temporary
    assert reply.text.isascii()
    french, sep, english = reply.text.partition(" / ")
    assert sep and french and english


# --- configuration --------------------------------------------------------------------


def test_defaults() -> None:
    limits = Limits()
    assert limits.messages_per_minute == 120
    # RFC 5321 4.5.3.1.8: at least 100 recipients must be accepted.
    assert limits.recipients_per_message >= 100
    assert limits.bad_recipients_per_session == 5
    assert limits.bad_recipients_per_day == 50
    assert limits.close_after_bad_in_session == 10


@pytest.mark.parametrize(
    "name", ["messages_per_minute", "recipients_per_message", "tracked_identities"]
)
@pytest.mark.parametrize("value", [0, -1])
def test_limits_must_be_positive(name: str, value: int) -> None:
    with pytest.raises(ValueError, match=name):
        Limits(**{name: value})


def test_decision_that_closes_answers_421() -> None:
    with pytest.raises(ValueError, match="421"):
        Decision(TOO_MANY_MESSAGES, closes_session=True)


@pytest.mark.parametrize("identity", ["", "ip:", "192.0.2.1", "host:mx.example"])
def test_identity_needs_a_known_kind(clock: FakeClock, identity: str) -> None:
    with pytest.raises(ValueError, match="identity"):
        AbuseGuard(Limits(), clock).session(identity)


# --- identities -----------------------------------------------------------------------


def test_peer_identity_prefers_certificate_then_account_then_ip() -> None:
    dn = "CN=mx.operateur.example,O=Operateur,C=FR"
    assert peer_identity(cert_subject=dn, account="a@x.fr", ip="192.0.2.1") == f"cert:{dn}"
    assert peer_identity(account=" Dr.Martin@X.fr ", ip="192.0.2.1") == "account:dr.martin@x.fr"
    assert peer_identity(ip="192.0.2.1") == IP
    with pytest.raises(ValueError, match="no peer identity"):
        peer_identity()


def test_ipv6_peers_count_per_slash_64() -> None:
    one = peer_identity(ip="2001:db8:1:2::1")
    assert one == "ip:2001:db8:1:2::/64"
    assert peer_identity(ip="2001:db8:1:2:ffff:ffff:ffff:ffff") == one
    assert peer_identity(ip="2001:db8:1:3::1") != one
    assert peer_identity(ip="::ffff:192.0.2.1") == IP


# --- messages per minute --------------------------------------------------------------


def test_messages_per_minute_boundary(clock: FakeClock) -> None:
    session = guard_with(clock, messages_per_minute=3).session(IP)
    assert [session.check_message().ok for _ in range(3)] == [True] * 3
    refused = session.check_message()
    assert refused.reply == TOO_MANY_MESSAGES and not refused.closes_session


def test_messages_window_slides(clock: FakeClock) -> None:
    guard = guard_with(clock, messages_per_minute=3)
    session = guard.session(IP)
    assert session.check_message().ok  # t=0
    clock.advance(seconds=30)
    assert session.check_message().ok  # t=30
    assert session.check_message().ok  # t=30
    clock.advance(seconds=29.999)
    assert not session.check_message().ok  # t=59.999: all three still count
    clock.advance(seconds=0.001)
    assert session.check_message().ok  # t=60: the first has left the window
    assert not session.check_message().ok
    assert guard.messages_in_window(IP) == 3
    clock.advance(seconds=30)
    assert session.check_message().ok  # t=90: the two of t=30 have left
    assert session.check_message().ok
    assert not session.check_message().ok


def test_message_budget_is_shared_by_sessions_of_one_identity(clock: FakeClock) -> None:
    guard = guard_with(clock, messages_per_minute=2)
    first, second = guard.session(IP), guard.session(IP)
    assert first.check_message().ok
    assert second.check_message().ok
    assert not first.check_message().ok
    assert not second.check_message().ok


def test_refused_message_is_not_counted(clock: FakeClock) -> None:
    guard = guard_with(clock, messages_per_minute=2, close_after_bad_in_session=100)
    session = guard.session(IP)
    assert session.check_message().ok
    assert session.check_message().ok
    for _ in range(10):
        assert not session.check_message().ok
    assert guard.messages_in_window(IP) == 2
    clock.advance(minutes=1)
    assert session.check_message().ok


# --- recipients per message -----------------------------------------------------------


def test_recipients_per_message_boundary(clock: FakeClock) -> None:
    session = guard_with(clock, recipients_per_message=100).session(IP)
    for accepted in range(100):
        assert session.check_recipient(accepted) is ALLOW
    refused = session.check_recipient(100)
    assert refused.reply == TOO_MANY_RECIPIENTS
    assert not refused.closes_session


def test_too_many_recipients_is_not_a_strike(clock: FakeClock) -> None:
    # RFC 5321 4.5.3.1.10: a pipelining client may meet 452 many times in a
    # row and send the rest in the next transaction; that is not probing.
    session = guard_with(clock, recipients_per_message=2).session(IP)
    for _ in range(50):
        assert session.check_recipient(2).reply == TOO_MANY_RECIPIENTS
    assert session.strikes == 0
    assert session.check_recipient(0) is ALLOW


# --- bad recipients -------------------------------------------------------------------


def test_bad_recipients_per_session_boundary(clock: FakeClock) -> None:
    session = guard_with(clock, bad_recipients_per_session=5).session(IP)
    spend_bad(session, 5)  # five truthful refusals
    refused = session.check_recipient(0)
    assert refused.reply == TOO_MANY_BAD_RECIPIENTS
    assert not refused.closes_session


def test_valid_recipients_refused_once_over_budget(clock: FakeClock) -> None:
    """Harvesting: once over budget a valid address gets the same reply as an unknown one."""
    session = guard_with(clock, bad_recipients_per_session=2).session(IP)
    session.check_message()
    spend_bad(session, 2)
    # The caller checks before routing, so the reply cannot depend on the address.
    for_valid = session.check_recipient(0)
    for_unknown = session.check_recipient(0)
    assert for_valid.reply == for_unknown.reply == TOO_MANY_BAD_RECIPIENTS
    # Even with accepted recipients on the envelope, and within the message limits.
    assert session.check_recipient(1).reply == TOO_MANY_BAD_RECIPIENTS


def test_session_budget_resets_with_a_new_session(clock: FakeClock) -> None:
    guard = guard_with(clock, bad_recipients_per_session=5, bad_recipients_per_day=50)
    first = guard.session(IP)
    spend_bad(first, 5)
    assert not first.check_recipient(0).ok
    second = guard.session(IP)
    assert second.check_recipient(0) is ALLOW
    assert guard.bad_recipients_in_window(IP) == 5


def test_bad_recipients_per_day_boundary_across_sessions(clock: FakeClock) -> None:
    guard = guard_with(clock, bad_recipients_per_session=5, bad_recipients_per_day=50)
    for _ in range(10):
        spend_bad(guard.session(IP), 5)
        clock.advance(minutes=10)
    assert guard.bad_recipients_in_window(IP) == 50
    refused = guard.session(IP).check_recipient(0)
    assert refused.reply == TOO_MANY_BAD_RECIPIENTS
    assert "24 hours" in refused.reason


def test_day_window_is_rolling(clock: FakeClock) -> None:
    guard = guard_with(clock, bad_recipients_per_session=2, bad_recipients_per_day=4)
    spend_bad(guard.session(IP), 2)  # t=0
    clock.advance(hours=12)
    spend_bad(guard.session(IP), 2)  # t=12h
    clock.advance(hours=11, minutes=59, seconds=59)
    assert not guard.session(IP).check_recipient(0).ok  # t=23:59:59, four in 24 h
    clock.advance(seconds=1)
    session = guard.session(IP)  # t=24h: the two of t=0 have left the window
    spend_bad(session, 2)
    assert not guard.session(IP).check_recipient(0).ok
    clock.advance(hours=12)  # t=36h: the two of t=12h have left
    assert guard.bad_recipients_in_window(IP) == 2
    assert guard.session(IP).check_recipient(0) is ALLOW


def test_day_budget_is_shared_by_concurrent_sessions(clock: FakeClock) -> None:
    guard = guard_with(clock, bad_recipients_per_session=3, bad_recipients_per_day=4)
    first, second = guard.session(IP), guard.session(IP)
    spend_bad(first, 2)
    spend_bad(second, 2)
    assert first.check_recipient(0).reply == TOO_MANY_BAD_RECIPIENTS
    assert second.check_recipient(0).reply == TOO_MANY_BAD_RECIPIENTS


# --- closing a probing session --------------------------------------------------------


def test_probing_session_is_closed_on_the_tenth_strike(clock: FakeClock) -> None:
    session = guard_with(clock).session(IP)  # defaults: 5 per session, close after 10
    spend_bad(session, 5)  # strikes 1-5: truthful refusals
    for strike in range(6, 10):
        decision = session.check_recipient(0)
        assert decision.reply == TOO_MANY_BAD_RECIPIENTS, strike
        assert not decision.closes_session
    closing = session.check_recipient(0)
    assert closing.reply == PROBING_CLOSED
    assert closing.closes_session
    assert session.closed and session.strikes == 10
    # Whatever comes after (pipelined commands) gets the same 421.
    assert session.check_message() == closing
    assert session.check_recipient(0) == closing
    assert session.record_bad_recipient() == closing


def test_close_can_come_from_a_bad_recipient(clock: FakeClock) -> None:
    # With the close threshold at or under the session budget, the refused
    # recipient that reaches it gets 421 instead of routing's answer.
    session = guard_with(clock, bad_recipients_per_session=5, close_after_bad_in_session=3).session(
        IP
    )
    spend_bad(session, 2)
    assert session.check_recipient(0) is ALLOW
    decision = session.record_bad_recipient()
    assert decision.reply == PROBING_CLOSED and decision.closes_session


def test_message_rate_refusals_are_strikes(clock: FakeClock) -> None:
    session = guard_with(clock, messages_per_minute=1, close_after_bad_in_session=3).session(IP)
    assert session.check_message().ok
    assert session.check_message().reply == TOO_MANY_MESSAGES
    assert session.check_message().reply == TOO_MANY_MESSAGES
    assert session.check_message().closes_session


def test_closing_one_session_leaves_others_open(clock: FakeClock) -> None:
    guard = guard_with(clock, close_after_bad_in_session=2, bad_recipients_per_day=50)
    probing, other = guard.session(IP), guard.session(IP)
    spend_bad(probing, 1)
    assert probing.check_recipient(0).ok
    assert probing.record_bad_recipient().closes_session
    assert other.check_recipient(0) is ALLOW


# --- per-identity isolation -----------------------------------------------------------


def test_two_ips_are_counted_apart(clock: FakeClock) -> None:
    guard = guard_with(clock, messages_per_minute=1, bad_recipients_per_day=2)
    one, two = guard.session(IP), guard.session(OTHER_IP)
    assert one.check_message().ok
    assert not one.check_message().ok
    assert two.check_message().ok
    spend_bad(guard.session(IP), 2)
    assert not guard.session(IP).check_recipient(0).ok
    assert guard.session(OTHER_IP).check_recipient(0) is ALLOW


def test_certificate_and_ip_are_counted_apart(clock: FakeClock) -> None:
    guard = guard_with(clock, bad_recipients_per_day=2)
    spend_bad(guard.session(IP), 2)
    assert not guard.session(IP).check_recipient(0).ok
    # The same host, once it presents its certificate, is another identity.
    assert guard.session(CERT).check_recipient(0) is ALLOW


# --- clock ----------------------------------------------------------------------------


def test_clock_stepping_back_neither_resets_nor_blocks(clock: FakeClock) -> None:
    guard = guard_with(clock, messages_per_minute=2)
    session = guard.session(IP)
    assert session.check_message().ok
    assert session.check_message().ok
    clock.advance(hours=-1)  # the system clock is stepped back an hour
    assert not session.check_message().ok
    clock.advance(seconds=59)
    assert not session.check_message().ok
    clock.advance(seconds=1)  # a minute has really gone by
    assert session.check_message().ok


# --- memory bound ---------------------------------------------------------------------


def test_tracked_identities_are_bounded_least_recent_forgotten(clock: FakeClock) -> None:
    guard = guard_with(clock, tracked_identities=3, messages_per_minute=1)
    for n in range(1, 5):
        assert guard.session(f"ip:192.0.2.{n}").check_message().ok
    assert len(guard) == 3
    assert "ip:192.0.2.1" not in guard
    assert all(f"ip:192.0.2.{n}" in guard for n in (2, 3, 4))
    # Using identity 2 makes it recent: identity 3 is forgotten next.
    assert not guard.session("ip:192.0.2.2").check_message().ok
    assert guard.session("ip:192.0.2.5").check_message().ok
    assert len(guard) == 3
    assert "ip:192.0.2.3" not in guard and "ip:192.0.2.2" in guard
    # A forgotten identity starts afresh.
    assert guard.session("ip:192.0.2.1").check_message().ok


def test_many_identities_stay_within_the_bound(clock: FakeClock) -> None:
    guard = guard_with(clock, tracked_identities=100)
    for n in range(5000):
        session = guard.session(f"ip:10.0.{n // 256}.{n % 256}")
        session.check_message()
        session.check_recipient(0)
        session.record_bad_recipient()
        assert len(guard) <= 100
    assert len(guard) == 100
    assert "ip:10.0.19.135" in guard  # the last one (n=4999)
    assert "ip:10.0.0.0" not in guard


def test_session_survives_its_identity_being_forgotten(clock: FakeClock) -> None:
    guard = guard_with(clock, tracked_identities=1, bad_recipients_per_session=2)
    session = guard.session(IP)
    spend_bad(session, 2)
    guard.session(OTHER_IP).check_message()  # forgets IP
    assert IP not in guard
    # The per-session count lives in the session: still over budget.
    assert session.check_recipient(0).reply == TOO_MANY_BAD_RECIPIENTS


# --- property: a well-behaved caller never sees more than the limits allow ------------

SMALL = Limits(
    messages_per_minute=3,
    recipients_per_message=2,
    bad_recipients_per_session=2,
    bad_recipients_per_day=5,
    close_after_bad_in_session=4,
    tracked_identities=8,
)

ADVANCES = [0.0, 0.5, 1.0, 30.0, 59.5, 60.0, 3600.0]
# (what, which, flag): advance the clock by ADVANCES[which]; open a session
# for identity ``which``; MAIL or RCPT (bad when ``flag``) in session ``which``.
steps = st.lists(
    st.tuples(
        st.sampled_from(["advance", "session", "mail", "rcpt"]),
        st.integers(0, len(ADVANCES) - 1),
        st.booleans(),
    ),
    max_size=200,
)


@dataclass
class Transcript:
    """What each identity got from the guard, as the client would see it."""

    messages: dict[str, list[float]] = field(default_factory=dict)  # MAIL allowed, at t
    truths: dict[str, list[float]] = field(default_factory=dict)  # bad answered truthfully

    def within(self, times: list[float], span: float) -> int:
        """The most events in any window of ``span`` seconds (times sorted)."""
        start, most = 0, 0
        for end, t in enumerate(times):
            while t - times[start] >= span:
                start += 1
            most = max(most, end - start + 1)
        return most


@settings(max_examples=300, deadline=None)
@given(steps)
def test_random_calls_never_exceed_the_limits(
    program: list[tuple[str, int, bool]],
) -> None:
    clock = FakeClock()
    guard = AbuseGuard(SMALL, clock)
    identities = ["ip:192.0.2.1", "ip:192.0.2.2", CERT]
    # Fewer identities than tracked: nothing is forgotten, counts are exact.
    assert len(identities) < SMALL.tracked_identities
    t = 0.0
    sessions: list[tuple[str, SessionGuard, list[int]]] = []  # identity, guard, accepted
    seen = Transcript()
    for what, which, is_bad in program:
        if what == "advance":
            clock.advance(seconds=ADVANCES[which])
            t += ADVANCES[which]
            continue
        if what == "session":
            identity = identities[which % len(identities)]
            sessions.append((identity, guard.session(identity), [0]))
            continue
        if not sessions:
            continue
        identity, session, accepted = sessions[which % len(sessions)]
        if what == "mail":
            decision = session.check_message()
            if decision.ok:
                seen.messages.setdefault(identity, []).append(t)
                accepted[0] = 0  # a new transaction
        else:
            decision = session.check_recipient(accepted[0])
            if decision.ok:
                if is_bad:
                    decision = session.record_bad_recipient()
                    if decision.ok:
                        seen.truths.setdefault(identity, []).append(t)
                else:
                    accepted[0] += 1
            assert accepted[0] <= SMALL.recipients_per_message
        if not decision.ok:
            assert decision.reply is not None and decision.reply.is_temporary
            assert decision.closes_session == (decision.reply == PROBING_CLOSED)
        assert session.strikes <= SMALL.close_after_bad_in_session
        assert session.bad_recipients <= SMALL.bad_recipients_per_session
        assert session.closed == (session.strikes >= SMALL.close_after_bad_in_session)
    for times in seen.messages.values():
        assert seen.within(times, 60.0) <= SMALL.messages_per_minute
    for times in seen.truths.values():
        assert seen.within(times, 24 * 3600.0) <= SMALL.bad_recipients_per_day
    assert len(guard) <= SMALL.tracked_identities
