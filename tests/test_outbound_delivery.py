"""One delivery attempt against fake professional operators (tests/outbound_fakes.py).

Real sockets and real mutual TLS with a test PKI; only the operators and DNS
are fake.  No database here: the worker's tests cover the rows.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import dkim as dkimpy
import pytest

from mssante.dkim import DkimSigner, generate_key
from mssante.outbound.delivery import ClientTls, OperatorDelivery, Outcome
from mssante.outbound.routes import (
    DnsTemporary,
    MxResolver,
    NextHop,
    NextHopResolver,
    NoMxRecords,
    NoSuchDomain,
    RouteError,
    StaticRoutes,
)
from mssante.routing.trust import TrustSpace, read_whitelist
from mssante.smtp.tls import client_context
from tests.outbound_fakes import (
    CHU,
    CHU_DN,
    MESSAGE,
    PATIENT_DN,
    PATIENT_FROM,
    UNLISTED,
    FakeMx,
    FakeOperator,
    TrustWorld,
    running_operator,
)

DR = f"dr.durand@{CHU}"
SIGNING_KEY = generate_key("ed25519-sha256")


@pytest.fixture
def world(tmp_path: Path) -> TrustWorld:
    return TrustWorld(tmp_path / "world")


@pytest.fixture
async def chu(world: TrustWorld) -> AsyncIterator[FakeOperator]:
    async with running_operator(world, "chu", CHU_DN) as fake:
        yield fake


def signer() -> DkimSigner:
    return DkimSigner(domain="patient.mssante.fr", selector="patient", private_key_pem=SIGNING_KEY)


def make_delivery(
    world: TrustWorld,
    routes: NextHopResolver,
    *,
    timeout: float = 10.0,
    verify_operator_dn: bool = True,
) -> OperatorDelivery:
    space = TrustSpace(
        patient_domain="patient.mssante.fr", operators=read_whitelist(world.whitelist)
    )
    return OperatorDelivery(
        trust=lambda: space,
        routes=routes,
        tls=ClientTls(
            anchors=world.anchors,
            cert=world.client_cert,
            key=world.client_key,
            crls=(world.crl,),
        ),
        signer=signer(),
        local_hostname="mx.patient.mssante.test",
        timeout=timeout,
        verify_operator_dn=verify_operator_dn,
    )


def to(fake: FakeOperator, domain: str = CHU, host: str = "127.0.0.1") -> StaticRoutes:
    return StaticRoutes({domain: f"{host}:{fake.port}"})


def dkim_lookup(name: bytes, timeout: int = 5) -> bytes | None:
    if name.decode().rstrip(".") == signer().key_name:
        return signer().dns_record().encode()
    return None


# --- the good path -----------------------------------------------------------------------


async def test_delivered_over_mutual_tls_and_dkim_signed(
    world: TrustWorld, chu: FakeOperator
) -> None:
    delivery = make_delivery(world, to(chu))
    (result,) = await delivery.deliver(CHU, PATIENT_FROM, [DR], MESSAGE)
    assert (result.outcome, result.code) == (Outcome.SENT, 250)
    (mail,) = chu.received
    assert (mail.mail_from, mail.rcpt_tos) == (PATIENT_FROM, [DR])
    # The operator saw our client certificate (mutual TLS).
    assert mail.client_dn == PATIENT_DN
    # Signed for the patient domain; dkimpy (independent) verifies it.
    assert mail.data.startswith(b"DKIM-Signature:")
    assert b"d=patient.mssante.fr" in mail.data.split(b"\r\n\r\n")[0].replace(b"\r\n", b"")
    assert mail.data.endswith(MESSAGE)
    assert dkimpy.verify(mail.data, dnsfunc=dkim_lookup)
    assert not dkimpy.verify(mail.data.replace(b"confidentiel", b"modifie"), dnsfunc=dkim_lookup)


async def test_each_recipient_gets_its_own_result(world: TrustWorld, chu: FakeOperator) -> None:
    ok, gone, busy = f"ok@{CHU}", f"parti@{CHU}", f"plein@{CHU}"
    chu.refuse = {
        gone: "550 5.1.1 Destinataire inconnu",
        busy: "452 4.2.2 Boite pleine",
    }
    results = await make_delivery(world, to(chu)).deliver(
        CHU, PATIENT_FROM, [ok, gone, busy], MESSAGE
    )
    assert [(r.address, r.outcome, r.code) for r in results] == [
        (ok, Outcome.SENT, 250),
        (gone, Outcome.PERMANENT, 550),
        (busy, Outcome.TEMPORARY, 452),
    ]
    assert results[1].detail == "550 5.1.1 Destinataire inconnu"
    assert [m.rcpt_tos for m in chu.received] == [[ok]]


async def test_temporary_and_permanent_replies_at_data(
    world: TrustWorld, chu: FakeOperator
) -> None:
    delivery = make_delivery(world, to(chu))
    chu.temp_failures = 1
    (temp,) = await delivery.deliver(CHU, PATIENT_FROM, [DR], MESSAGE)
    assert (temp.outcome, temp.code) == (Outcome.TEMPORARY, 451)
    assert temp.detail.startswith("451 4.3.0")
    chu.permanent = True
    (perm,) = await delivery.deliver(CHU, PATIENT_FROM, [DR], MESSAGE)
    assert (perm.outcome, perm.code) == (Outcome.PERMANENT, 550)
    assert chu.received == []


async def test_null_sender_for_dsns(world: TrustWorld, chu: FakeOperator) -> None:
    (result,) = await make_delivery(world, to(chu)).deliver(CHU, "", [DR], MESSAGE)
    assert result.outcome is Outcome.SENT
    assert chu.received[0].mail_from == "<>"


# --- the trust space ----------------------------------------------------------------------


@pytest.mark.parametrize("domain", [UNLISTED, "gmail.com"])
async def test_a_domain_outside_the_whitelist_is_never_contacted(
    world: TrustWorld, chu: FakeOperator, domain: str
) -> None:
    """Issue 7: mail never leaves the trust space.  ``intrus.mssante.fr`` has the
    MSSanté suffix and a route to a running operator, yet is not listed."""
    mx = FakeMx({domain: [(10, "127.0.0.1")]})
    for routes in (to(chu, domain), MxResolver(mx, port=chu.port)):
        (result,) = await make_delivery(world, routes).deliver(
            domain, PATIENT_FROM, [f"dr@{domain}"], MESSAGE
        )
        assert result.outcome is Outcome.PERMANENT
        assert result.detail == f"domain {domain} not in the whitelist"
    assert chu.connections == 0
    assert mx.asked == []  # not even a DNS query


async def test_no_starttls_offered_is_temporary_and_nothing_goes_in_clear(
    world: TrustWorld, chu: FakeOperator
) -> None:
    chu.starttls = False
    (result,) = await make_delivery(world, to(chu)).deliver(CHU, PATIENT_FROM, [DR], MESSAGE)
    assert result.outcome is Outcome.TEMPORARY
    assert "STARTTLS not offered" in result.detail
    assert chu.connections == 1 and chu.received == []


@pytest.mark.parametrize(
    ("certificate", "expected"),
    [
        ("rogue", "certificate verify failed"),  # another CA
        ("revoked", "certificate revoked"),  # our anchors' CRL
        ("impostor", "is not the listed operator's"),  # right CA, wrong subject
    ],
)
async def test_an_untrusted_server_certificate_is_temporary(
    world: TrustWorld, chu: FakeOperator, certificate: str, expected: str
) -> None:
    chu.certificate = certificate
    (result,) = await make_delivery(world, to(chu)).deliver(CHU, PATIENT_FROM, [DR], MESSAGE)
    assert result.outcome is Outcome.TEMPORARY
    assert expected in result.detail
    assert chu.received == []


async def test_the_server_name_must_match_the_certificate(
    world: TrustWorld, chu: FakeOperator
) -> None:
    """The certificate names mx.test.localhost and 127.0.0.1, not ``localhost``."""
    wrong = to(chu, host="localhost")
    (result,) = await make_delivery(world, wrong).deliver(CHU, PATIENT_FROM, [DR], MESSAGE)
    assert result.outcome is Outcome.TEMPORARY
    assert "Hostname mismatch" in result.detail
    assert chu.received == []


async def test_operator_dn_check_can_be_turned_off(world: TrustWorld, chu: FakeOperator) -> None:
    chu.certificate = "impostor"
    delivery = make_delivery(world, to(chu), verify_operator_dn=False)
    (result,) = await delivery.deliver(CHU, PATIENT_FROM, [DR], MESSAGE)
    assert result.outcome is Outcome.SENT


async def test_our_certificate_is_required_by_the_operator(
    world: TrustWorld, chu: FakeOperator
) -> None:
    """The fake really checks client certificates: without ours, no delivery."""
    space = TrustSpace(
        patient_domain="patient.mssante.fr", operators=read_whitelist(world.whitelist)
    )
    delivery = OperatorDelivery(
        trust=lambda: space,
        routes=to(chu),
        tls=lambda: client_context(world.anchors),
        signer=signer(),
        local_hostname="mx.patient.mssante.test",
        timeout=10.0,
    )
    (result,) = await delivery.deliver(CHU, PATIENT_FROM, [DR], MESSAGE)
    assert result.outcome is Outcome.TEMPORARY
    assert chu.connections == 1 and chu.received == []


async def test_a_slow_operator_times_out_as_temporary(world: TrustWorld, chu: FakeOperator) -> None:
    chu.hold()
    delivery = make_delivery(world, to(chu), timeout=0.5)
    (result,) = await delivery.deliver(CHU, PATIENT_FROM, [DR], MESSAGE)
    assert result.outcome is Outcome.TEMPORARY
    assert "SMTPReadTimeoutError" in result.detail
    chu.release()
    assert chu.received == []


# --- next hops ----------------------------------------------------------------------------


async def test_the_next_mx_is_tried_when_the_first_cannot_be_reached(
    world: TrustWorld, chu: FakeOperator
) -> None:
    mx = FakeMx({CHU: [(20, "127.0.0.1"), (10, "mx1.unreachable.invalid")]})
    delivery = make_delivery(world, MxResolver(mx, port=chu.port))
    (result,) = await delivery.deliver(CHU, PATIENT_FROM, [DR], MESSAGE)
    assert result.outcome is Outcome.SENT
    assert len(chu.received) == 1


async def test_null_mx_and_unknown_domain_are_permanent_dns_trouble_temporary(
    world: TrustWorld,
) -> None:
    for answer, outcome in [
        ([(0, "")], Outcome.PERMANENT),
        (NoSuchDomain("nx"), Outcome.PERMANENT),
        (DnsTemporary("SERVFAIL"), Outcome.TEMPORARY),
    ]:
        delivery = make_delivery(world, MxResolver(FakeMx({CHU: answer})))
        (result,) = await delivery.deliver(CHU, PATIENT_FROM, [DR], MESSAGE)
        assert result.outcome is outcome, answer


async def test_mx_resolver_order_implicit_mx_and_null_mx() -> None:
    mx = FakeMx(
        {
            "a.fr": [(20, "mx3.a.fr"), (10, "MX1.a.fr"), (10, "mx2.a.fr")],
            "b.fr": NoMxRecords("no MX"),
            "c.fr": [(0, "")],
            "d.fr": NoSuchDomain("nx"),
            "e.fr": DnsTemporary("timeout"),
        }
    )
    resolver = MxResolver(mx, rng=random.Random(1))
    hops = await resolver.resolve("A.fr.")
    assert {h.host for h in hops[:2]} == {"mx1.a.fr", "mx2.a.fr"}
    assert hops[2] == NextHop("mx3.a.fr", 25)
    # RFC 5321 5.1: equal preferences are shuffled (both orders happen).
    orders = {
        tuple(h.host for h in await MxResolver(mx, rng=random.Random(s)).resolve("a.fr"))
        for s in range(20)
    }
    assert len(orders) == 2
    assert await resolver.resolve("b.fr") == [NextHop("b.fr", 25)]  # implicit MX
    for domain, permanent in (("c.fr", True), ("d.fr", True), ("e.fr", False)):
        with pytest.raises(RouteError) as exc:
            await resolver.resolve(domain)
        assert exc.value.permanent is permanent


async def test_static_routes() -> None:
    routes = StaticRoutes({"Chu.mssante.fr": "10.0.0.5:2525", "x.fr": "[::1]:25"})
    assert await routes.resolve("chu.mssante.fr") == [NextHop("10.0.0.5", 2525)]
    assert await routes.resolve("x.fr") == [NextHop("::1", 25)]
    with pytest.raises(RouteError) as exc:
        await routes.resolve("other.fr")
    assert exc.value.permanent


async def test_the_patient_domain_is_never_a_destination_even_if_listed(
    world: TrustWorld, chu: FakeOperator
) -> None:
    """The real whitelist lists patient.mssante.fr too: mail must not loop to it."""
    operators = {**read_whitelist(world.whitelist), "patient.mssante.fr": frozenset()}
    space = TrustSpace(patient_domain="patient.mssante.fr", operators=operators)
    delivery = OperatorDelivery(
        trust=lambda: space,
        routes=to(chu, "patient.mssante.fr"),
        tls=lambda: client_context(world.anchors, world.client_cert, world.client_key),
        signer=signer(),
        local_hostname="mx.patient.mssante.test",
        timeout=10.0,
    )
    (result,) = await delivery.deliver(
        "patient.mssante.fr", PATIENT_FROM, ["146026322000196@patient.mssante.fr"], MESSAGE
    )
    assert result.outcome is Outcome.PERMANENT
    assert result.detail == "domain patient.mssante.fr is the patient domain, not an operator's"
    assert chu.connections == 0
