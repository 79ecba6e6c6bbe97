"""Webmail credentials (issue 8): activation codes, passwords, TOTP, throttling, closing.

On SQLite and PostgreSQL.  Work is compared through the hasher's
verification counter and the writer's job counter, never with a stopwatch.
argon2id runs with light parameters here (same algorithm, same code path);
production keeps argon2-cffi's defaults.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pyotp
import pytest
from argon2 import PasswordHasher
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from mssante import demo
from mssante.app import Gateway, Store
from mssante.cli import seed_demo
from mssante.pseudonym import Pseudonymizer
from mssante.routing.ins import with_key
from mssante.settings import WebSettings
from mssante.smtp import replies
from mssante.store import credentials
from mssante.store import directory as dirops
from mssante.store.credentials import (
    ActivationRefusal,
    ActivationResult,
    LoginRefusal,
    LoginResult,
    SecretHasher,
)
from mssante.store.models import (
    ActivationCode,
    AuditEvent,
    Channel,
    Patient,
    PatientCredentials,
    ProfileStatus,
    WebSession,
)
from mssante.store.patient_changes import PatientChange, apply
from tests.conftest import FakeClock, make_settings
from tests.test_gateway import addr, rcpt_reply

UNKNOWN_INS = with_key("1851275123999")
JEAN_BORN = date(1979, 1, 17)  # demo.CREATED_EMAIL
PASSWORD = "cheval agrafe batterie"
KEY = Pseudonymizer(b"k" * 32)


@pytest.fixture(autouse=True)
def hasher(monkeypatch: pytest.MonkeyPatch) -> SecretHasher:
    light = SecretHasher(PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
    monkeypatch.setattr(credentials, "HASHER", light)
    return light


WEB = WebSettings(login_failures=3, login_failures_per_address=5, lockout_seconds=600)


@pytest.fixture
async def store(data_dir: Path, db_url: str) -> AsyncIterator[Store]:
    settings = make_settings(data_dir, database_url=db_url)
    st = Store(settings.model_copy(update={"web": WEB}))
    await st.open()
    await seed_demo(st)
    try:
        yield st
    finally:
        await st.close()


async def patient(store: Store, ins: str) -> Patient:
    async with store.reads() as session:
        found = await dirops.get_patient(session, ins)
    assert found is not None
    return found


async def codes(store: Store, patient_id: int) -> list[ActivationCode]:
    async with store.reads() as session:
        rows = await session.scalars(
            select(ActivationCode)
            .where(ActivationCode.patient_id == patient_id)
            .order_by(ActivationCode.id)
        )
        return list(rows)


async def events(store: Store, kind: str, patient_id: int | None = None) -> list[AuditEvent]:
    async with store.reads() as session:
        stmt = select(AuditEvent).where(AuditEvent.kind == kind).order_by(AuditEvent.id)
        if patient_id is not None:
            stmt = stmt.where(AuditEvent.patient_id == patient_id)
        return list(await session.scalars(stmt))


async def issue(store: Store, clock: FakeClock, ins: str = demo.CREATED_EMAIL) -> str:
    p = await patient(store, ins)
    issued = await credentials.issue_activation_code(
        store, p.id, at=clock.now(), channel=Channel.EMAIL
    )
    return issued.code


async def check(
    store: Store,
    clock: FakeClock,
    code: str,
    *,
    ins: str = demo.CREATED_EMAIL,
    born: date | None = JEAN_BORN,
) -> ActivationResult:
    return await credentials.check_activation(
        store, ins=ins, birth_date=born, code=code, at=clock.now()
    )


async def activated(store: Store, clock: FakeClock, email: str = "Jean.Dupont@Example.org") -> int:
    """demo.CREATED_EMAIL through the whole activation; its patient id."""
    result = await check(store, clock, await issue(store, clock))
    assert result.ok and result.patient_id is not None
    done = await credentials.activate(
        store, result.patient_id, password=PASSWORD, email=email, at=clock.now()
    )
    assert done.ok
    return result.patient_id


async def add_session(store: Store, sid: str, patient_id: int, **kw: Any) -> None:
    now = FakeClock().now()

    async def job(session: AsyncSession) -> None:
        session.add(
            WebSession(
                id=sid,
                patient_id=patient_id,
                acting_for=kw.get("acting_for"),
                csrf="c",
                state={},
                created_at=now,
                last_seen_at=now,
                expires_at=now + timedelta(hours=1),
            )
        )

    await store.writer.run(job)


async def session_ids(store: Store) -> set[str]:
    async with store.reads() as session:
        return set(await session.scalars(select(WebSession.id)))


# --- activation codes --------------------------------------------------------------------------


async def test_issued_code_is_stored_as_an_argon2id_hash_only(
    store: Store, clock: FakeClock
) -> None:
    code = await issue(store, clock)
    assert len(code) == 14 and code[4] == code[9] == "-"
    assert set(code.replace("-", "")) <= set(credentials.CODE_ALPHABET)
    assert not set(code) & set("01OIL")
    p = await patient(store, demo.CREATED_EMAIL)
    (row,) = await codes(store, p.id)
    assert row.code_hash.startswith("$argon2id$")
    stored = " ".join(str(getattr(row, c.key)) for c in ActivationCode.__table__.columns)
    issued = await events(store, "activation.code_issued", p.id)
    stored += json.dumps([e.details for e in issued])
    for form in (code, code.replace("-", ""), code.replace("-", "").lower()):
        assert form not in stored
    assert issued[0].details["channel"] == "email"


async def test_code_is_valid_42_days_to_the_second(store: Store, clock: FakeClock) -> None:
    start = clock.now()
    code = await issue(store, clock)
    p = await patient(store, demo.CREATED_EMAIL)
    (row,) = await codes(store, p.id)
    assert row.expires_at == start + timedelta(days=42)
    clock.advance(days=42, seconds=-1)
    assert (await check(store, clock, code)).ok
    clock.advance(seconds=1)
    assert (await check(store, clock, code)).refusal is ActivationRefusal.EXPIRED


async def test_typed_code_may_differ_in_case_and_separators(store: Store, clock: FakeClock) -> None:
    code = await issue(store, clock)
    typed = " " + code.replace("-", " ").lower() + " "
    assert (await check(store, clock, typed, ins=" ".join(demo.CREATED_EMAIL))).ok


async def test_wrong_tries_spend_the_code(store: Store, clock: FakeClock) -> None:
    code = await issue(store, clock)
    p = await patient(store, demo.CREATED_EMAIL)
    for _ in range(5):  # web.activation_code_attempts
        result = await check(store, clock, "AAAA-BBBB-CCCC")
        assert result.refusal is ActivationRefusal.WRONG_CODE
    result = await check(store, clock, code)
    assert result.refusal is ActivationRefusal.SPENT and result.patient_id is None
    (row,) = await codes(store, p.id)
    assert row.attempts == 5
    refused = await events(store, "activation.code_refused", p.id)
    assert [e.details["spent"] for e in refused] == [False] * 4 + [True]


async def test_successful_checks_do_not_spend_the_code(store: Store, clock: FakeClock) -> None:
    code = await issue(store, clock)
    for _ in range(7):
        assert (await check(store, clock, code)).ok


async def test_wrong_birth_date_is_refused_and_counts_as_a_try(
    store: Store, clock: FakeClock
) -> None:
    code = await issue(store, clock)
    p = await patient(store, demo.CREATED_EMAIL)
    assert (await check(store, clock, code, born=date(1979, 1, 18))).refusal is (
        ActivationRefusal.BIRTH_DATE
    )
    assert (await check(store, clock, code, born=None)).refusal is ActivationRefusal.BIRTH_DATE
    (row,) = await codes(store, p.id)
    assert row.attempts == 2


async def test_reissue_revokes_the_earlier_code(store: Store, clock: FakeClock) -> None:
    first = await issue(store, clock)
    clock.advance(minutes=5)
    second = await issue(store, clock)
    p = await patient(store, demo.CREATED_EMAIL)
    old, new = await codes(store, p.id)
    assert old.revoked_at == clock.now() and new.revoked_at is None
    assert not (await check(store, clock, first)).ok
    assert (await check(store, clock, second)).ok
    assert (await events(store, "activation.code_issued", p.id))[1].details["revoked"] == 1


async def test_only_a_created_profile_gets_a_code(store: Store, clock: FakeClock) -> None:
    for ins in (demo.ACTIVATED, demo.OPPOSED, demo.CLOSED):
        with pytest.raises(ValueError, match="only a created profile"):
            await issue(store, clock, ins)


async def test_unknown_ins_and_wrong_code_cost_the_same(
    store: Store, clock: FakeClock, hasher: SecretHasher
) -> None:
    await issue(store, clock)
    cases = {
        "wrong code": (demo.CREATED_EMAIL, JEAN_BORN),
        "unknown INS": (UNKNOWN_INS, JEAN_BORN),
        "not an INS": ("12345", JEAN_BORN),
        "activated profile": (demo.ACTIVATED, date(1984, 5, 3)),
        "no code issued": (demo.CREATED_POSTAL, date(1992, 7, 9)),
    }
    answers = {}
    for name, (ins, born) in cases.items():
        verifications, jobs = hasher.verifications, store.writer.jobs
        answers[name] = await check(store, clock, "AAAA-BBBB-CCCC", ins=ins, born=born)
        assert (hasher.verifications - verifications, store.writer.jobs - jobs) == (1, 1), name
    assert {type(a) for a in answers.values()} == {ActivationResult}
    assert all(not a.ok and a.patient_id is None for a in answers.values())
    assert answers["unknown INS"].refusal is ActivationRefusal.UNKNOWN
    assert answers["wrong code"].refusal is ActivationRefusal.WRONG_CODE


async def test_activation_sets_password_address_status_and_audits(
    store: Store, clock: FakeClock
) -> None:
    code = await issue(store, clock)
    result = await check(store, clock, code)
    assert result.patient_id is not None
    clock.advance(minutes=3)
    done = await credentials.activate(
        store,
        result.patient_id,
        password=PASSWORD,
        email=" Jean.Dupont@Example.org ",
        at=clock.now(),
    )
    assert done == ActivationResult(patient_id=result.patient_id)
    p = await patient(store, demo.CREATED_EMAIL)
    assert p.status is ProfileStatus.ACTIVATED
    assert p.activated_at == clock.now()
    assert p.activation_email == "jean.dupont@example.org"
    async with store.reads() as session:
        creds = await session.get(PatientCredentials, p.id)
    assert creds is not None and creds.password_hash.startswith("$argon2id$")
    assert PasswordHasher().verify(creds.password_hash, PASSWORD)
    (row,) = await codes(store, p.id)
    assert row.used_at == clock.now()
    (event,) = await events(store, "patient.activated", p.id)
    text = json.dumps(event.details).lower()
    assert "dupont" not in text and demo.CREATED_EMAIL not in text
    # Used: neither the check nor a second activation goes through again.
    assert (await check(store, clock, code)).refusal is ActivationRefusal.NOT_CREATED
    again = await credentials.activate(
        store, p.id, password=PASSWORD, email="autre@example.org", at=clock.now()
    )
    assert again.refusal is ActivationRefusal.NOT_CREATED


async def test_activation_refused_when_the_status_changed_meanwhile(
    store: Store, clock: FakeClock
) -> None:
    result = await check(store, clock, await issue(store, clock))
    assert result.patient_id is not None

    async def oppose(session: AsyncSession) -> None:
        change = PatientChange(demo.CREATED_EMAIL, {"status": ProfileStatus.OPPOSED})
        await apply(session, change, at=clock.now(), actor="test", details={})

    await store.writer.run(oppose)
    done = await credentials.activate(
        store, result.patient_id, password=PASSWORD, email="jean@example.org", at=clock.now()
    )
    assert done.refusal is ActivationRefusal.NOT_CREATED
    p = await patient(store, demo.CREATED_EMAIL)
    assert p.status is ProfileStatus.OPPOSED and p.activation_email is None


async def test_activation_refuses_a_weak_password(store: Store, clock: FakeClock) -> None:
    result = await check(store, clock, await issue(store, clock))
    assert result.patient_id is not None
    with pytest.raises(ValueError, match="12 caractères"):
        await credentials.activate(
            store, result.patient_id, password="court", email="j@example.org", at=clock.now()
        )
    assert (await patient(store, demo.CREATED_EMAIL)).status is ProfileStatus.CREATED


# --- passwords -------------------------------------------------------------------------------


def test_password_policy_in_french() -> None:
    def problems(password: str) -> list[str]:
        return credentials.password_problems(password, ins=demo.CREATED_EMAIL, birth_date=JEAN_BORN)

    assert problems(PASSWORD) == []
    assert problems("court") == ["Le mot de passe doit contenir au moins 12 caractères."]
    assert "matricule INS" in " ".join(problems(f"x{demo.CREATED_EMAIL}x"))
    assert "matricule INS" in " ".join(problems("1 79 01 69 123 902 zz"))
    assert "date de naissance" in " ".join(problems("jean-17/01/1979!"))
    assert "date de naissance" in " ".join(problems("jean19790117zz"))
    for weak in ("motdepasse2024!", "Azertyuiop123", "aaaaaaaaaaaaaaa", "Password12345"):
        assert "trop courant" in " ".join(problems(weak)), weak


async def test_login_by_ins_or_address(
    store: Store, clock: FakeClock, hasher: SecretHasher
) -> None:
    pid = await activated(store, clock)
    spaced = " ".join([demo.CREATED_EMAIL[:1], demo.CREATED_EMAIL[1:3], demo.CREATED_EMAIL[3:]])
    for identifier in (
        demo.CREATED_EMAIL,
        spaced,
        "JEAN.DUPONT@example.ORG",
        " jean.dupont@example.org ",
    ):
        before = hasher.verifications
        result = await credentials.verify_login(store, identifier, PASSWORD, at=clock.now())
        assert result == LoginResult(patient_id=pid), identifier
        assert hasher.verifications - before == 1
    wrong = await credentials.verify_login(
        store, demo.CREATED_EMAIL, "x" + PASSWORD, at=clock.now()
    )
    assert wrong == LoginResult(refusal=LoginRefusal.WRONG_PASSWORD)


async def test_login_refusals_cost_one_verification_each(
    store: Store, clock: FakeClock, hasher: SecretHasher
) -> None:
    await activated(store, clock)
    cases = {
        UNKNOWN_INS: LoginRefusal.UNKNOWN,
        "personne@example.org": LoginRefusal.UNKNOWN,
        "n'importe quoi": LoginRefusal.UNKNOWN,
        demo.ACTIVATED: LoginRefusal.NO_PASSWORD,  # activated without the webmail
        demo.OPPOSED: LoginRefusal.NOT_ACTIVATED,
        demo.CREATED_POSTAL: LoginRefusal.NOT_ACTIVATED,
        demo.CREATED_EMAIL: LoginRefusal.WRONG_PASSWORD,
    }
    for identifier, refusal in cases.items():
        before = hasher.verifications
        result = await credentials.verify_login(store, identifier, "mauvais", at=clock.now())
        assert result == LoginResult(refusal=refusal), identifier
        assert hasher.verifications - before == 1, identifier


async def test_corsican_ins_logs_in_whatever_the_case(store: Store, clock: FakeClock) -> None:
    p = await patient(store, demo.CORSICAN)
    password_hash = PasswordHasher().hash(PASSWORD)

    async def job(session: AsyncSession) -> None:
        session.add(
            PatientCredentials(
                patient_id=p.id,
                password_hash=password_hash,
                totp_sealed=None,
                created_at=clock.now(),
                updated_at=clock.now(),
            )
        )

    await store.writer.run(job)
    typed = demo.CORSICAN.lower()[:7] + " " + demo.CORSICAN[7:]
    assert "2a" in typed
    result = await credentials.verify_login(store, typed, PASSWORD, at=clock.now())
    assert result.patient_id == p.id


async def test_new_password_ends_the_other_sessions(store: Store, clock: FakeClock) -> None:
    pid = await activated(store, clock)
    for sid in ("mine", "phone", "old-laptop"):
        await add_session(store, sid, pid)
    ended = await credentials.set_password(
        store, pid, "un autre mot de passe", at=clock.now(), keep_session="mine"
    )
    assert ended == 2 and await session_ids(store) == {"mine"}
    assert await credentials.check_password(store, pid, "un autre mot de passe")
    assert not await credentials.check_password(store, pid, PASSWORD)
    old = await credentials.verify_login(store, demo.CREATED_EMAIL, PASSWORD, at=clock.now())
    assert old.refusal is LoginRefusal.WRONG_PASSWORD
    (event,) = await events(store, "web.password_changed", pid)
    assert event.details == {"sessions_ended": 2}


# --- TOTP ---------------------------------------------------------------------------------------


async def test_totp_enable_check_window_and_no_replay(store: Store, clock: FakeClock) -> None:
    pid = await activated(store, clock)
    secret = credentials.new_totp_secret()
    totp = pyotp.TOTP(secret)
    step = totp.timecode(clock.now())

    def code(s: int) -> str:
        return totp.generate_otp(s)

    assert not await credentials.enable_totp(store, pid, secret, "000000", at=clock.now())
    assert not await credentials.totp_required(store, pid)
    assert await credentials.enable_totp(store, pid, secret, code(step), at=clock.now())
    assert await credentials.totp_required(store, pid)
    login = await credentials.verify_login(store, demo.CREATED_EMAIL, PASSWORD, at=clock.now())
    assert login.ok and login.totp
    # The code that turned it on cannot open a session as well.
    assert not await credentials.check_totp(store, pid, code(step), at=clock.now())

    clock.advance(seconds=90)  # now step + 3
    assert not await credentials.check_totp(store, pid, code(step + 1), at=clock.now())  # too old
    assert await credentials.check_totp(store, pid, code(step + 2), at=clock.now())  # window
    assert not await credentials.check_totp(store, pid, code(step + 2), at=clock.now())  # replay
    assert await credentials.check_totp(
        store, pid, f" {code(step + 3)[:3]} {code(step + 3)[3:]}", at=clock.now()
    )
    assert await credentials.check_totp(store, pid, code(step + 4), at=clock.now())  # window
    assert not await credentials.check_totp(store, pid, code(step + 3), at=clock.now())  # used
    assert not await credentials.check_totp(store, pid, code(step + 5), at=clock.now())  # future

    async with store.reads() as session:
        creds = await session.get(PatientCredentials, pid)
    assert creds is not None and creds.totp_sealed is not None
    assert secret.encode() not in creds.totp_sealed
    assert len(await events(store, "web.totp_enabled", pid)) == 1

    assert await credentials.disable_totp(store, pid, at=clock.now())
    assert not await credentials.disable_totp(store, pid, at=clock.now())
    assert not await credentials.totp_required(store, pid)
    assert not await credentials.check_totp(store, pid, code(step + 6), at=clock.now())
    assert len(await events(store, "web.totp_disabled", pid)) == 1


async def test_totp_secret_is_bound_to_its_patient(store: Store, clock: FakeClock) -> None:
    """A sealed secret copied onto another patient's row does not open it."""
    pid = await activated(store, clock)
    secret = credentials.new_totp_secret()
    totp = pyotp.TOTP(secret)
    assert await credentials.enable_totp(store, pid, secret, totp.at(clock.now()), at=clock.now())
    other = await patient(store, demo.CORSICAN)

    async def copy(session: AsyncSession) -> None:
        mine = await session.get(PatientCredentials, pid)
        assert mine is not None
        await store.keyring.data_key(session, other.id, at=clock.now())
        session.add(
            PatientCredentials(
                patient_id=other.id,
                password_hash=mine.password_hash,
                totp_sealed=mine.totp_sealed,
                created_at=clock.now(),
                updated_at=clock.now(),
            )
        )

    await store.writer.run(copy)
    clock.advance(seconds=30)
    assert not await credentials.check_totp(store, other.id, totp.at(clock.now()), at=clock.now())
    assert await credentials.check_totp(store, pid, totp.at(clock.now()), at=clock.now())


# --- throttling -----------------------------------------------------------------------------


@pytest.mark.parametrize("identifier", [demo.CREATED_EMAIL, "personne@example.org"])
async def test_identifier_locked_after_n_failures_then_unlocked(
    store: Store, clock: FakeClock, identifier: str
) -> None:
    """The same answers whether the identifier belongs to somebody or not."""
    keys = credentials.throttle_keys(KEY, identifier, "192.0.2.1")
    assert identifier.lower() not in keys[0]
    for _ in range(2):
        assert await credentials.record_failure(store, keys, at=clock.now()) is None
        assert await credentials.throttle_status(store, keys, at=clock.now()) is None
    until = clock.now() + timedelta(seconds=600)
    assert await credentials.record_failure(store, keys, at=clock.now()) == until
    clock.advance(seconds=599)
    assert await credentials.throttle_status(store, keys, at=clock.now()) == until
    other = credentials.throttle_keys(KEY, "quelqu.un@example.org", "192.0.2.1")
    assert await credentials.throttle_status(store, other, at=clock.now()) is None
    clock.advance(seconds=1)
    assert await credentials.throttle_status(store, keys, at=clock.now()) is None
    # Counting starts again after the lockout.
    assert await credentials.record_failure(store, keys, at=clock.now()) is None


async def test_failures_outside_the_window_do_not_add_up(store: Store, clock: FakeClock) -> None:
    keys = credentials.throttle_keys(KEY, demo.CREATED_EMAIL)
    for _ in range(2):
        assert await credentials.record_failure(store, keys, at=clock.now()) is None
    clock.advance(seconds=600)
    for _ in range(2):
        assert await credentials.record_failure(store, keys, at=clock.now()) is None
    assert await credentials.record_failure(store, keys, at=clock.now()) is not None


async def test_success_clears_the_identifier(store: Store, clock: FakeClock) -> None:
    keys = credentials.throttle_keys(KEY, demo.CREATED_EMAIL, "192.0.2.1")
    for _ in range(2):
        await credentials.record_failure(store, keys, at=clock.now())
    await credentials.clear(store, keys[0], at=clock.now())
    for _ in range(2):
        assert await credentials.record_failure(store, keys, at=clock.now()) is None


async def test_one_address_trying_many_identifiers_is_locked(
    store: Store, clock: FakeClock
) -> None:
    for i in range(4):
        keys = credentials.throttle_keys(KEY, f"essai{i}@example.org", "198.51.100.7")
        assert await credentials.record_failure(store, keys, at=clock.now()) is None
    keys = credentials.throttle_keys(KEY, "essai4@example.org", "198.51.100.7")
    assert await credentials.record_failure(store, keys, at=clock.now()) is not None
    fresh = credentials.throttle_keys(KEY, demo.CREATED_EMAIL, "198.51.100.7")
    assert await credentials.throttle_status(store, fresh, at=clock.now()) is not None
    elsewhere = credentials.throttle_keys(KEY, demo.CREATED_EMAIL, "203.0.113.9")
    assert await credentials.throttle_status(store, elsewhere, at=clock.now()) is None


def test_throttle_keys_normalise_the_identifier() -> None:
    spaced = demo.CORSICAN[:5] + " " + demo.CORSICAN[5:].lower()
    assert credentials.throttle_keys(KEY, spaced) == credentials.throttle_keys(KEY, demo.CORSICAN)
    assert credentials.throttle_keys(KEY, "A@Example.org ") == credentials.throttle_keys(
        KEY, "a@example.org"
    )
    assert credentials.throttle_keys(KEY, "a@example.org") != (
        credentials.throttle_keys(KEY, "b@example.org")
    )
    with_address = credentials.throttle_keys(KEY, "a@example.org", "192.0.2.1")
    assert (
        len(with_address) == 2
        and with_address[0] == credentials.throttle_keys(KEY, "a@example.org")[0]
    )


# --- e-mail confirmation codes ------------------------------------------------------------------


def test_email_confirmation_code() -> None:
    code, stored = credentials.new_email_code()
    assert len(code) == 6 and code.isdigit()
    assert credentials.email_code_matches(stored, code)
    assert credentials.email_code_matches(stored, f" {code[:3]} {code[3:]} ")
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    assert not credentials.email_code_matches(stored, wrong)
    assert not credentials.email_code_matches(stored, "")
    nonce, _, digest = stored.partition("$")
    assert not credentials.email_code_matches(f"{nonce}x${digest}", code)
    assert not credentials.email_code_matches(digest, code)
    assert credentials.new_email_code()[1] != credentials.new_email_code()[1]


# --- closing -----------------------------------------------------------------------------------


async def test_closing_ends_sessions_and_the_gateway_refuses_mail(
    gateway: Gateway, clock: FakeClock
) -> None:
    store = gateway.store
    pid = await activated(store, clock)
    minor = await patient(store, demo.MINOR)
    other = await patient(store, demo.ACTIVATED)
    await add_session(store, "own-1", pid)
    await add_session(store, "own-2", pid)
    await add_session(store, "as-representative", other.id, acting_for=pid)
    await add_session(store, "somebody-else", other.id, acting_for=minor.id)
    code, _ = await rcpt_reply(gateway, addr(demo.CREATED_EMAIL))
    assert code == replies.RECIPIENT_OK.code

    await credentials.close_mailbox(store, pid, at=clock.now(), actor="web")

    assert await session_ids(store) == {"somebody-else"}
    assert (await patient(store, demo.CREATED_EMAIL)).status is ProfileStatus.CLOSED
    (event,) = await events(store, "mailbox.closed", pid)
    assert event.details["from"] == "activated" and event.details["sessions_ended"] == 3
    closed = replies.MAILBOX_CLOSED
    assert await rcpt_reply(gateway, addr(demo.CREATED_EMAIL)) == (
        closed.code,
        f"{closed.enhanced} {closed.text}",
    )
    login = await credentials.verify_login(store, demo.CREATED_EMAIL, PASSWORD, at=clock.now())
    assert login.refusal is LoginRefusal.NOT_ACTIVATED
    # Closing again records nothing more.
    await credentials.close_mailbox(store, pid, at=clock.now(), actor="web")
    assert len(await events(store, "mailbox.closed", pid)) == 1
