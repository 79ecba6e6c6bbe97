"""How a patient gets into the webmail (issue 8): activation, passwords, TOTP, throttling.

- **Activation.** A created profile (DOMAIN.md 3) is activated with a
  provisional code sent by the notification channels (``mssante patients
  issue-code``, web/activation.py), the INS and the birth date.  Only an
  argon2id hash of the code is stored; it is valid
  ``web.activation_code_days`` and spent after ``web.activation_code_attempts``
  wrong tries; issuing a new code revokes the earlier ones.
- **Passwords** are argon2id hashes (RFC 9106, argon2-cffi's defaults, as
  store/accounts.py), hashed and verified in a worker thread, never on the
  event loop.
- **TOTP** (RFC 6238), optional: the secret is sealed under the patient's
  data key, with the last time step used, so a code is accepted once.
- **Throttling**: failures counted per keyed hash of the identifier and of
  the client address, whether the identifier exists or not.

Nothing here tells a caller *why* a login or an activation failed in a way
meant for the person typing: results carry a reason for the logs, and the
webmail shows one message whatever it is.  Every path that may end in a
refusal costs one argon2 verification (against a dummy hash when there is
nothing to compare with), so timing does not tell which INS or address has
an account either.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import hmac
import logging
import secrets
import threading
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING

import pyotp
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import ColumnElement, delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from mssante.routing.ins import Ins, parse_ins
from mssante.store import audit
from mssante.store.crypto import DecryptionError
from mssante.store.keys import KeyDestroyedError, seal_json, unseal_json
from mssante.store.models import (
    ActivationCode,
    Channel,
    LoginThrottle,
    Patient,
    PatientCredentials,
    ProfileStatus,
    WebSession,
)

if TYPE_CHECKING:
    from mssante.app import Store

log = logging.getLogger(__name__)

KeyedHash = Callable[[str], str]  # a Pseudonymizer: HMAC under the data directory's key

# --- argon2id, off the event loop -------------------------------------------------------


class SecretHasher:
    """argon2id hashes of passwords and activation codes.

    ``verify`` always does exactly one argon2 verification, against a dummy
    hash when there is no stored one, and counts them: the tests check that
    an unknown INS costs the same work as a known one through this counter,
    not with a stopwatch.
    """

    def __init__(self, hasher: PasswordHasher | None = None) -> None:
        self._hasher = hasher or PasswordHasher()
        self._dummy: str | None = None
        self._lock = threading.Lock()
        self.verifications = 0

    async def hash(self, secret: str) -> str:
        return await asyncio.to_thread(self._hasher.hash, secret)

    async def verify(self, stored: str | None, secret: str) -> bool:
        self.verifications += 1
        return await asyncio.to_thread(self._verify, stored, secret)

    def needs_rehash(self, stored: str) -> bool:
        return self._hasher.check_needs_rehash(stored)

    def _dummy_hash(self) -> str:
        with self._lock:
            if self._dummy is None:  # made with the same parameters: it costs the same
                self._dummy = self._hasher.hash(secrets.token_hex(16))
            return self._dummy

    def _verify(self, stored: str | None, secret: str) -> bool:
        try:
            return self._hasher.verify(stored or self._dummy_hash(), secret) and stored is not None
        except (VerificationError, InvalidHashError):
            return False


HASHER = SecretHasher()

# --- identifiers ------------------------------------------------------------------------------

_MAX_EMAIL = 320  # RFC 5321 4.5.3.1: 64 + 1 + 255


def normalise_ins(text: str) -> str | None:
    """An INS as people type it: spaces (and dots, dashes) removed, ``2a`` -> ``2A``."""
    compact = "".join(c for c in text if not (c.isspace() or c in ".-"))
    ins = parse_ins(compact)
    return ins.value if isinstance(ins, Ins) else None


def normalise_email(text: str) -> str | None:
    """A plausible address, lower-case (compared case-insensitively), or None."""
    address = text.strip().lower()
    local, at, domain = address.rpartition("@")
    if (
        not at
        or not local
        or "." not in domain
        or len(address) > _MAX_EMAIL
        or any(c.isspace() or not c.isprintable() for c in address)
    ):
        return None
    return address


def normalise_identifier(text: str) -> str | None:
    """A login identifier: an INS or an e-mail address, normalised; None if neither."""
    return normalise_email(text) if "@" in text else normalise_ins(text)


# --- provisional activation codes ----------------------------------------------------------

# No 0/O, 1/I/L: read on paper and typed by hand.  31 symbols, 12 of them:
# about 59 bits, far beyond what 5 tries in 6 weeks can guess.
CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
CODE_LENGTH = 12
_CODE_GROUP = 4
_MAX_TYPED = 64  # longer input is cut before hashing (the code has 12 characters)


class ActivationRefusal(enum.StrEnum):
    """Why an activation was refused: for the logs, never for the person typing."""

    UNKNOWN = "unknown"  # not an INS, or no such patient
    NOT_CREATED = "not_created"  # the profile is activated, opposed or closed
    NO_CODE = "no_code"  # no code issued, or it was used or revoked
    EXPIRED = "expired"
    SPENT = "spent"  # too many wrong tries
    BIRTH_DATE = "birth_date"  # the code may be right, the birth date is not (a try)
    WRONG_CODE = "wrong_code"  # a try


@dataclass(frozen=True, slots=True)
class ActivationResult:
    """Accepted (``patient_id``) or refused (``refusal``)."""

    patient_id: int | None = None
    refusal: ActivationRefusal | None = None

    @property
    def ok(self) -> bool:
        return self.refusal is None


@dataclass(frozen=True, slots=True)
class IssuedCode:
    """A code just issued.  ``code`` exists only here: the database has its hash."""

    id: int
    code: str  # XXXX-XXXX-XXXX
    issued_at: datetime
    expires_at: datetime
    channel: Channel


def new_activation_code() -> str:
    raw = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
    return "-".join(raw[i : i + _CODE_GROUP] for i in range(0, CODE_LENGTH, _CODE_GROUP))


def normalise_code(text: str) -> str:
    """What is hashed: the code without separators, upper-case."""
    return "".join(c for c in text[:_MAX_TYPED].upper() if c.isalnum())


def _live(patient_id: int) -> list[ColumnElement[bool]]:
    """Codes neither used nor revoked (expired ones included: they say why)."""
    return [
        ActivationCode.patient_id == patient_id,
        ActivationCode.used_at.is_(None),
        ActivationCode.revoked_at.is_(None),
    ]


async def issue_activation_code(
    store: Store, patient_id: int, *, at: datetime, channel: Channel, actor: str = "cli"
) -> IssuedCode:
    """A new provisional code for a created profile; earlier unused codes are revoked.

    Raises LookupError for an unknown patient, ValueError if the profile is
    not in status created.
    """
    code = new_activation_code()
    code_hash = await HASHER.hash(normalise_code(code))
    expires_at = at + timedelta(days=store.settings.web.activation_code_days)

    async def job(session: AsyncSession) -> IssuedCode:
        patient = await session.get(Patient, patient_id)
        if patient is None:
            raise LookupError("patient not found")
        if patient.status is not ProfileStatus.CREATED:
            raise ValueError(
                f"profile is {patient.status.value}: only a created profile gets an activation code"
            )
        earlier = list(await session.scalars(select(ActivationCode).where(*_live(patient_id))))
        for row in earlier:
            row.revoked_at = at
        row = ActivationCode(
            patient_id=patient_id,
            code_hash=code_hash,
            channel=channel,
            created_at=at,
            expires_at=expires_at,
            attempts=0,
            used_at=None,
            revoked_at=None,
        )
        session.add(row)
        await session.flush()
        await audit.append(
            session,
            at=at,
            kind="activation.code_issued",
            actor=actor,
            patient_id=patient_id,
            details={
                "channel": channel.value,
                "expires_at": expires_at.isoformat(),
                "revoked": len(earlier),
            },
        )
        return IssuedCode(row.id, code, at, expires_at, channel)

    return await store.writer.run(job)


@dataclass(frozen=True, slots=True)
class _Candidate:
    code_id: int | None
    code_hash: str | None


async def _candidate(store: Store, ins: str | None) -> _Candidate:
    async with store.reads() as session:
        patient_id = None
        if ins is not None:
            patient_id = await session.scalar(select(Patient.id).where(Patient.ins == ins))
        code = None
        if patient_id is not None:
            code = await session.scalar(
                select(ActivationCode)
                .where(*_live(patient_id))
                .order_by(ActivationCode.id.desc())
                .limit(1)
            )
    if code is None:
        return _Candidate(None, None)
    return _Candidate(code.id, code.code_hash)


async def check_activation(
    store: Store, *, ins: str, birth_date: date | None, code: str, at: datetime
) -> ActivationResult:
    """Step 1 of activation: INS, birth date and provisional code.

    Always one read, one argon2 verification and one writer transaction.
    The writer job decides: a verification that ran while the last tries
    were being used up is discarded, so parallel guesses get no more than
    ``web.activation_code_attempts`` answers.  The code is marked used by
    :func:`activate`, not here.
    """
    limit = store.settings.web.activation_code_attempts
    normalised = normalise_ins(ins)
    candidate = await _candidate(store, normalised)
    matches = await HASHER.verify(candidate.code_hash, normalise_code(code))

    async def job(session: AsyncSession) -> ActivationResult:
        # The same first statement whether the INS exists or not.
        patient = await session.scalar(select(Patient).where(Patient.ins == (normalised or "")))
        if patient is None:
            return ActivationResult(refusal=ActivationRefusal.UNKNOWN)
        if patient.status is not ProfileStatus.CREATED:
            return ActivationResult(refusal=ActivationRefusal.NOT_CREATED)
        row = (
            await session.get(ActivationCode, candidate.code_id)
            if candidate.code_id is not None
            else None
        )
        if row is None or row.used_at is not None or row.revoked_at is not None:
            # None issued, or used or re-issued since the read: nothing was tried.
            return ActivationResult(refusal=ActivationRefusal.NO_CODE)
        if at >= row.expires_at:
            return ActivationResult(refusal=ActivationRefusal.EXPIRED)
        if row.attempts >= limit:
            return ActivationResult(refusal=ActivationRefusal.SPENT)
        birth_ok = birth_date is not None and patient.birth_date == birth_date
        if matches and birth_ok:
            return ActivationResult(patient_id=patient.id)
        # A wrong birth date is a try too: whoever holds the code cannot guess it.
        row.attempts += 1
        reason = ActivationRefusal.WRONG_CODE if not matches else ActivationRefusal.BIRTH_DATE
        await audit.append(
            session,
            at=at,
            kind="activation.code_refused",
            actor="web",
            patient_id=patient.id,
            details={
                "reason": reason.value,
                "attempts": row.attempts,
                "spent": row.attempts >= limit,
            },
        )
        return ActivationResult(refusal=reason)

    return await store.writer.run(job)


async def _acceptable_password_hash(store: Store, patient_id: int, password: str) -> str:
    """The argon2id hash of ``password`` once :func:`password_problems` accepts it for
    this patient (ValueError with the first problem; LookupError: no such patient)."""
    async with store.reads() as session:
        patient = await session.get(Patient, patient_id)
        if patient is None:
            raise LookupError("patient not found")
        problems = password_problems(password, ins=patient.ins, birth_date=patient.birth_date)
    if problems:
        raise ValueError(problems[0])
    return await HASHER.hash(password)


async def activate(
    store: Store, patient_id: int, *, password: str, email: str, at: datetime
) -> ActivationResult:
    """Last step of activation, in one writer transaction: password, personal
    address (confirmed by the caller with an e-mail code), status activated,
    code used.  Refused (NOT_CREATED, NO_CODE) if the profile or its code
    changed since :func:`check_activation`.

    Raises ValueError for a password :func:`password_problems` refuses or a
    malformed address: the caller checks both first.
    """
    address = normalise_email(email)
    if address is None:
        raise ValueError("not an e-mail address")
    password_hash = await _acceptable_password_hash(store, patient_id, password)

    async def job(session: AsyncSession) -> ActivationResult:
        patient = await session.get(Patient, patient_id)
        if patient is None or patient.status is not ProfileStatus.CREATED:
            return ActivationResult(refusal=ActivationRefusal.NOT_CREATED)
        codes = list(await session.scalars(select(ActivationCode).where(*_live(patient_id))))
        if not codes:
            return ActivationResult(refusal=ActivationRefusal.NO_CODE)
        for code in codes:
            code.used_at = at
        credentials = await session.get(PatientCredentials, patient_id)
        if credentials is None:
            credentials = PatientCredentials(patient_id=patient_id, created_at=at, totp_sealed=None)
            session.add(credentials)
        credentials.password_hash = password_hash
        credentials.totp_sealed = None
        credentials.updated_at = at
        patient.activation_email = address
        patient.email_invalid = False  # just confirmed with a code sent there
        patient.status = ProfileStatus.ACTIVATED
        patient.activated_at = patient.activated_at or at
        patient.updated_at = at
        await audit.append(
            session,
            at=at,
            kind="patient.activated",
            actor="web",
            patient_id=patient_id,
            details={"from": ProfileStatus.CREATED.value, "codes": sorted(c.id for c in codes)},
        )
        return ActivationResult(patient_id=patient_id)

    return await store.writer.run(job)


# --- passwords ---------------------------------------------------------------------------------

MIN_PASSWORD = 12
MAX_PASSWORD = 256  # argon2 hashes anything, but a form field need not carry a book

# Bases of the most common French and English passwords: with digits or
# punctuation around them they stay weak ("motdepasse2024!").
_COMMON = frozenset(
    {
        "123456789",
        "1234567890",
        "123456789012",
        "abcdefghijkl",
        "admin",
        "azerty",
        "azertyuiop",
        "bonjour",
        "chouchou",
        "doudou",
        "football",
        "iloveyou",
        "jetaime",
        "loulou",
        "marseille",
        "messagerie",
        "messageriesante",
        "monespacesante",
        "motdepasse",
        "mssante",
        "password",
        "qwerty",
        "qwertyuiop",
        "sante",
        "soleil",
        "welcome",
    }
)
_MIN_DISTINCT = 5


def _fold(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def password_problems(password: str, *, ins: str, birth_date: date | None) -> list[str]:
    """What is wrong with a new password, in French; empty when it is acceptable."""
    problems = []
    if len(password) < MIN_PASSWORD:
        problems.append(f"Le mot de passe doit contenir au moins {MIN_PASSWORD} caractères.")
    if len(password) > MAX_PASSWORD:
        problems.append(f"Le mot de passe doit contenir au plus {MAX_PASSWORD} caractères.")
    folded = _fold(password)
    compact = "".join(c for c in folded if c.isalnum())
    digits = "".join(c for c in password if c.isdigit())
    if ins and ins[:13].lower() in compact:
        problems.append(
            "Le mot de passe ne doit pas contenir votre matricule INS (numéro de sécurité sociale)."
        )
    if birth_date is not None:
        forms = {
            f"{birth_date:%d%m%Y}",
            f"{birth_date:%Y%m%d}",
            f"{birth_date:%d%m%y}",
        }
        if any(f in digits for f in forms):
            problems.append("Le mot de passe ne doit pas contenir votre date de naissance.")
    base = compact.strip("0123456789")
    if compact in _COMMON or base in _COMMON or len(set(password)) < _MIN_DISTINCT:
        problems.append("Ce mot de passe est trop courant ou trop simple : choisissez-en un autre.")
    return problems


class LoginRefusal(enum.StrEnum):
    """Why a login was refused: for the logs, never for the person typing."""

    UNKNOWN = "unknown"  # not an identifier, or nobody has it
    NOT_ACTIVATED = "not_activated"  # the profile is not (or no longer) activated
    NO_PASSWORD = "no_password"  # noqa: S105 - activated without a webmail password
    WRONG_PASSWORD = "wrong_password"  # noqa: S105 - a reason, not a password


@dataclass(frozen=True, slots=True)
class LoginResult:
    patient_id: int | None = None
    refusal: LoginRefusal | None = None
    totp: bool = False  # a TOTP code is still needed (check_totp)

    @property
    def ok(self) -> bool:
        return self.refusal is None


_MAX_SAME_EMAIL = 5  # activated profiles sharing a personal address (a family's)


async def verify_login(
    store: Store, identifier: str, password: str, *, at: datetime
) -> LoginResult:
    """Password login by INS or by the address registered at activation.

    At least one argon2 verification whatever happens; one per account when
    several activated profiles share the address.
    """
    normalised = normalise_identifier(identifier)
    password = password[: MAX_PASSWORD * 4]
    candidates: list[tuple[int, ProfileStatus, str | None, bool]] = []
    if normalised is not None:
        where = (
            Patient.activation_email == normalised
            if "@" in normalised
            else Patient.ins == normalised
        )
        async with store.reads() as session:
            rows = await session.execute(
                select(
                    Patient.id,
                    Patient.status,
                    PatientCredentials.password_hash,
                    PatientCredentials.totp_sealed.is_not(None),
                )
                .outerjoin(PatientCredentials, PatientCredentials.patient_id == Patient.id)
                .where(where)
                .order_by(Patient.id)
                .limit(_MAX_SAME_EMAIL)
            )
            candidates = [(r[0], r[1], r[2], bool(r[3])) for r in rows]
    usable = [c for c in candidates if c[1] is ProfileStatus.ACTIVATED and c[2] is not None]
    if not usable:
        await HASHER.verify(None, password)
        if not candidates:
            return LoginResult(refusal=LoginRefusal.UNKNOWN)
        if all(c[1] is not ProfileStatus.ACTIVATED for c in candidates):
            return LoginResult(refusal=LoginRefusal.NOT_ACTIVATED)
        return LoginResult(refusal=LoginRefusal.NO_PASSWORD)
    for patient_id, _status, stored, totp in usable:
        assert stored is not None
        if await HASHER.verify(stored, password):
            if HASHER.needs_rehash(stored):
                await _store_password(store, patient_id, await HASHER.hash(password), at=at)
            return LoginResult(patient_id=patient_id, totp=totp)
    return LoginResult(refusal=LoginRefusal.WRONG_PASSWORD)


async def check_password(store: Store, patient_id: int, password: str) -> bool:
    """The current password of an activated patient (to change it, to close the mailbox)."""
    async with store.reads() as session:
        stored = await session.scalar(
            select(PatientCredentials.password_hash).where(
                PatientCredentials.patient_id == patient_id
            )
        )
    return await HASHER.verify(stored, password[: MAX_PASSWORD * 4])


async def _store_password(
    store: Store, patient_id: int, password_hash: str, *, at: datetime
) -> None:
    async def job(session: AsyncSession) -> None:
        await session.execute(
            update(PatientCredentials)
            .where(PatientCredentials.patient_id == patient_id)
            .values(password_hash=password_hash, updated_at=at)
        )

    await store.writer.run(job)


async def set_password(
    store: Store,
    patient_id: int,
    password: str,
    *,
    at: datetime,
    actor: str = "web",
    keep_session: str | None = None,
) -> int:
    """A new password for an activated patient (audited ``web.password_changed``).

    Every other web session of the patient ends (all but ``keep_session``,
    the one that changed it); returns how many ended.  Raises LookupError
    without credentials, ValueError for a password :func:`password_problems`
    refuses.
    """
    password_hash = await _acceptable_password_hash(store, patient_id, password)

    async def job(session: AsyncSession) -> int:
        credentials = await session.get(PatientCredentials, patient_id)
        if credentials is None:
            raise LookupError("patient has no webmail credentials")
        credentials.password_hash = password_hash
        credentials.updated_at = at
        ended = delete(WebSession).where(WebSession.patient_id == patient_id)
        if keep_session is not None:
            ended = ended.where(WebSession.id != keep_session)
        result = await session.execute(ended)
        count = int(getattr(result, "rowcount", 0) or 0)
        await audit.append(
            session,
            at=at,
            kind="web.password_changed",
            actor=actor,
            patient_id=patient_id,
            details={"sessions_ended": count},
        )
        return count

    return await store.writer.run(job)


# --- TOTP (RFC 6238) ---------------------------------------------------------------------------

TOTP_DIGITS = 6
TOTP_WINDOW = 1  # one 30-second step either side: clock drift and typing time


def totp_context(patient_id: int) -> bytes:
    return b"mssante/totp/%d" % patient_id


def new_totp_secret() -> str:
    """160 random bits in base32 (RFC 4226 4 recommends 160), for authenticator apps."""
    return base64.b32encode(secrets.token_bytes(20)).decode("ascii")


def totp_uri(secret: str, *, account: str, issuer: str) -> str:
    """The otpauth:// URI an authenticator app reads from a QR code."""
    return pyotp.TOTP(secret).provisioning_uri(name=account, issuer_name=issuer)


def _totp_step(secret: str, code: str, at: datetime, *, after: int | None) -> int | None:
    """The time step ``code`` belongs to (within the window, later than ``after``)."""
    code = "".join(code.split())
    if len(code) != TOTP_DIGITS or not code.isdigit():
        return None
    totp = pyotp.TOTP(secret, digits=TOTP_DIGITS)
    now = totp.timecode(at)
    found = None
    for step in range(now - TOTP_WINDOW, now + TOTP_WINDOW + 1):
        if hmac.compare_digest(totp.generate_otp(step), code) and (after is None or step > after):
            found = step
    return found


async def enable_totp(
    store: Store, patient_id: int, secret: str, code: str, *, at: datetime, actor: str = "web"
) -> bool:
    """Turn the second factor on once the patient typed a valid code for ``secret``.

    False (nothing stored) for a wrong code.  Raises LookupError without
    credentials (the profile is not activated).
    """
    step = _totp_step(secret, code, at, after=None)
    if step is None:
        return False

    async def job(session: AsyncSession) -> bool:
        credentials = await session.get(PatientCredentials, patient_id)
        if credentials is None:
            raise LookupError("patient has no webmail credentials")
        key = await store.keyring.data_key(session, patient_id, at=at)
        # The code just typed counts as used: it cannot open a session too.
        state = {"secret": secret, "last_step": step}
        credentials.totp_sealed = seal_json(key, state, totp_context(patient_id))
        credentials.updated_at = at
        await audit.append(
            session, at=at, kind="web.totp_enabled", actor=actor, patient_id=patient_id
        )
        return True

    return await store.writer.run(job)


async def totp_required(store: Store, patient_id: int) -> bool:
    async with store.reads() as session:
        sealed = await session.scalar(
            select(PatientCredentials.totp_sealed.is_not(None)).where(
                PatientCredentials.patient_id == patient_id
            )
        )
    return bool(sealed)


async def check_totp(store: Store, patient_id: int, code: str, *, at: datetime) -> bool:
    """A TOTP code for this patient, at most once per time step (no replay).

    In a writer job: reading the last step used and moving it on is one
    transaction, so two requests with the same code cannot both pass.
    """

    async def job(session: AsyncSession) -> bool:
        credentials = await session.get(PatientCredentials, patient_id)
        if credentials is None or credentials.totp_sealed is None:
            return False
        context = totp_context(patient_id)
        try:
            key = await store.keyring.data_key(session, patient_id)
        except KeyDestroyedError:  # erased profile
            return False
        try:
            state = unseal_json(key, credentials.totp_sealed, context)
        except DecryptionError:  # altered, or copied from another patient's row
            log.error("TOTP secret of patient %d does not decrypt: refused", patient_id)
            return False
        step = _totp_step(state["secret"], code, at, after=state.get("last_step"))
        if step is None:
            return False
        state["last_step"] = step
        credentials.totp_sealed = seal_json(key, state, context)
        return True

    return await store.writer.run(job)


async def disable_totp(store: Store, patient_id: int, *, at: datetime, actor: str = "web") -> bool:
    """Turn the second factor off; False if it was not on."""

    async def job(session: AsyncSession) -> bool:
        credentials = await session.get(PatientCredentials, patient_id)
        if credentials is None or credentials.totp_sealed is None:
            return False
        credentials.totp_sealed = None
        credentials.updated_at = at
        await audit.append(
            session, at=at, kind="web.totp_disabled", actor=actor, patient_id=patient_id
        )
        return True

    return await store.writer.run(job)


# --- login throttling --------------------------------------------------------------------------


def throttle_keys(
    keyed_hash: KeyedHash, identifier: str, client_address: str | None = None
) -> list[str]:
    """What a failure is counted against, as keyed hashes (no identity in the table).

    First the normalised identifier's key (``web.login_failures``; the one
    :func:`clear` takes), then the client address's
    (``web.login_failures_per_address``) when given.
    """
    normalised = normalise_identifier(identifier) or identifier.strip().lower()[:_MAX_EMAIL]
    keys = [keyed_hash("id:" + normalised)]
    if client_address:
        keys.append(keyed_hash("addr:" + client_address))
    return keys


def _limits(store: Store, keys: Sequence[str]) -> list[tuple[str, int]]:
    web = store.settings.web
    return [
        (key, web.login_failures if i == 0 else web.login_failures_per_address)
        for i, key in enumerate(keys)
    ]


async def throttle_status(store: Store, keys: Sequence[str], *, at: datetime) -> datetime | None:
    """Until when logins with these keys are refused, or None."""
    wanted = [k for k, _ in _limits(store, keys)]
    async with store.reads() as session:
        until = await session.scalars(
            select(LoginThrottle.locked_until).where(
                LoginThrottle.key.in_(wanted), LoginThrottle.locked_until > at
            )
        )
        found = [u for u in until if u is not None]
    return max(found) if found else None


async def record_failure(store: Store, keys: Sequence[str], *, at: datetime) -> datetime | None:
    """Count one failure; returns until when the keys are now locked, or None.

    Failures are counted from the first one in a window of
    ``web.lockout_seconds``; reaching the limit (``web.login_failures`` for
    an identifier, ``web.login_failures_per_address`` for a client address)
    locks for ``web.lockout_seconds``.
    """
    window = timedelta(seconds=store.settings.web.lockout_seconds)
    limits = _limits(store, keys)

    async def job(session: AsyncSession) -> datetime | None:
        locked: list[datetime] = []
        for key, limit in limits:
            row = await session.get(LoginThrottle, key)
            if row is None:
                row = LoginThrottle(key=key, failures=0, window_start=at, locked_until=None)
                session.add(row)
            elif row.window_start + window <= at:
                row.failures, row.window_start = 0, at
            row.failures += 1
            if row.failures >= limit:
                row.locked_until = at + window
                row.failures, row.window_start = 0, at
            if row.locked_until is not None and row.locked_until > at:
                locked.append(row.locked_until)
        return max(locked) if locked else None

    return await store.writer.run(job)


async def clear(store: Store, identifier_key: str, *, at: datetime) -> None:
    """After a successful login: forget the identifier's failures.

    Rows whose window and lock are over are removed too, so unknown
    identifiers tried once do not pile up.
    """
    stale = at - timedelta(seconds=store.settings.web.lockout_seconds)

    async def job(session: AsyncSession) -> None:
        await session.execute(
            delete(LoginThrottle).where(
                or_(
                    LoginThrottle.key == identifier_key,
                    (LoginThrottle.window_start <= stale)
                    & or_(LoginThrottle.locked_until.is_(None), LoginThrottle.locked_until <= at),
                )
            )
        )

    await store.writer.run(job)


# --- e-mail confirmation codes (activation, step 2) --------------------------------------------

EMAIL_CODE_DIGITS = 6


def _email_code_digest(nonce: str, code: str) -> str:
    return hmac.new(nonce.encode(), b"mssante/email-code\x00" + code.encode(), "sha256").hexdigest()


def new_email_code() -> tuple[str, str]:
    """(code to send, value to keep in the web session state: ``nonce$HMAC``).

    The code is worth something only inside the activation session that
    asked for it, whose cookie token the database does not hold (only its
    SHA-256, web/sessions.py): a copy of the sessions table that gave the
    6 digits away would open nothing.  The caller limits the tries and the
    time (``web.email_code_minutes``).
    """
    code = f"{secrets.randbelow(10**EMAIL_CODE_DIGITS):0{EMAIL_CODE_DIGITS}d}"
    nonce = secrets.token_hex(16)
    return code, f"{nonce}${_email_code_digest(nonce, code)}"


def email_code_matches(stored: str, code: str) -> bool:
    """Constant-time comparison of a typed code (spaces ignored) with the kept value."""
    nonce, sep, digest = stored.partition("$")
    typed = "".join(code.split())[: EMAIL_CODE_DIGITS * 2]
    expected = _email_code_digest(nonce, typed)
    return bool(sep and nonce) and hmac.compare_digest(digest.encode(), expected.encode())


# --- closing ---------------------------------------------------------------------------------


async def close_mailbox(store: Store, patient_id: int, *, at: datetime, actor: str) -> None:
    """Close a profile: status closed (the gateway then refuses mail, "messagerie
    fermée", DOMAIN.md 3), every web session on it ends, unused activation
    codes are revoked; audited ``mailbox.closed``.

    Sessions reading it as a representative end too.  Closing a closed
    profile ends what sessions remain and records nothing.
    """

    async def job(session: AsyncSession) -> None:
        patient = await session.get(Patient, patient_id)
        if patient is None:
            raise LookupError("patient not found")
        ended = await session.execute(
            delete(WebSession).where(
                or_(WebSession.patient_id == patient_id, WebSession.acting_for == patient_id)
            )
        )
        revoked = await session.execute(
            update(ActivationCode).where(*_live(patient_id)).values(revoked_at=at)
        )
        if patient.status is ProfileStatus.CLOSED:
            return
        old = patient.status
        patient.status = ProfileStatus.CLOSED
        patient.updated_at = at
        await audit.append(
            session,
            at=at,
            kind="mailbox.closed",
            actor=actor,
            patient_id=patient_id,
            details={
                "from": old.value,
                "sessions_ended": int(getattr(ended, "rowcount", 0) or 0),
                "codes_revoked": int(getattr(revoked, "rowcount", 0) or 0),
            },
        )

    await store.writer.run(job)


async def seed_password(store: Store, patient_id: int, password: str, *, at: datetime) -> bool:
    """Give an activated patient a password if they have none (the Quick start's demo).

    Returns False when credentials already exist (nothing changed)."""
    async with store.reads() as session:
        if await session.get(PatientCredentials, patient_id) is not None:
            return False
    password_hash = await HASHER.hash(password)

    async def job(session: AsyncSession) -> bool:
        if await session.get(PatientCredentials, patient_id) is not None:
            return False
        session.add(
            PatientCredentials(
                patient_id=patient_id, password_hash=password_hash, created_at=at, updated_at=at
            )
        )
        return True

    return await store.writer.run(job)
