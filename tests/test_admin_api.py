"""The admin API over real TLS sockets: authentication, every change, bulk, queues, audit, logs."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from cryptography import x509
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from mssante import demo
from mssante.admin import api as admin_api
from mssante.admin.auth import token_hash
from mssante.admin.problems import MEDIA_TYPE, TYPE_PREFIX, Kind
from mssante.app import Gateway, Role
from mssante.cli import main
from mssante.routing.ins import with_key
from mssante.settings import AdminSettings, SettingsError, load_settings
from mssante.smtp import replies
from mssante.store import audit, credentials
from mssante.store.models import (
    ActivationCode,
    AuditEvent,
    Channel,
    OutboundKind,
    Patient,
    ProfileStatus,
    WebSession,
)
from tests.admin import INSURER_CN, AdminApi, running_admin
from tests.conftest import FakeClock, make_settings
from tests.pki import Pki
from tests.test_gateway import addr, patient_id, professional_message, rcpt_reply, send

NEW = with_key("1990275123950")
OTHER = with_key("2010575123951")
ADDRESS = ["Nadia Haddad", "5 rue de la Paix", "33000 Bordeaux"]


def problem_type(response: httpx.Response) -> str:
    assert response.headers["content-type"] == MEDIA_TYPE, response.text
    body = response.json()
    assert body["status"] == response.status_code
    assert body["type"].startswith(TYPE_PREFIX)
    return str(body["type"]).removeprefix(TYPE_PREFIX)


async def patient(gw: Gateway, ins: str) -> Patient:
    async with gw.store.reads() as session:
        found = await session.scalar(select(Patient).where(Patient.ins == ins))
    assert found is not None
    return found


async def add_web_session(gw: Gateway, patient_id: int, *, acting_for: int | None = None) -> str:
    token = secrets.token_hex(32)
    now = gw.clock.now()

    async def job(session: Any) -> None:
        session.add(
            WebSession(
                id=token,
                patient_id=patient_id,
                acting_for=acting_for,
                csrf="x",
                state={},
                created_at=now,
                last_seen_at=now,
                expires_at=now + timedelta(hours=1),
            )
        )

    await gw.store.writer.run(job)
    return token


async def web_sessions(gw: Gateway) -> set[str]:
    async with gw.store.reads() as session:
        return set(await session.scalars(select(WebSession.id)))


async def codes(gw: Gateway, patient_id: int) -> list[ActivationCode]:
    async with gw.store.reads() as session:
        rows = await session.scalars(
            select(ActivationCode).where(ActivationCode.patient_id == patient_id)
        )
        return list(rows)


# --- settings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("admin", "says"),
    [
        ({"enabled": "true"}, "admin.enabled = true with neither admin.client_ca nor"),
        ({"client_ca": "/ca.pem"}, 'admin.client_ca = "/ca.pem" needs TLS: set admin.tls_cert'),
        ({"tls_cert": "/c.pem"}, 'admin.tls_cert = "/c.pem" and admin.tls_key = "": set both'),
        (
            {"enabled": "true", "tokens_file": "/t", "host": "0.0.0.0"},
            'admin.host = "0.0.0.0" without admin.tls_cert: bearer tokens would cross',
        ),
    ],
)
def test_settings_refuse_an_admin_api_nobody_safely_authenticates_to(
    admin: dict[str, str], says: str
) -> None:
    environ = {f"MSSANTE_ADMIN__{key.upper()}": value for key, value in admin.items()}
    with pytest.raises(SettingsError, match="invalid configuration") as refused:
        load_settings(None, environ)
    assert says in str(refused.value)


def test_settings_accept_tokens_on_loopback_or_mutual_tls() -> None:
    assert AdminSettings(enabled=True, tokens_file=Path("/t")).host == "127.0.0.1"
    tls = {"tls_cert": Path("/c"), "tls_key": Path("/k"), "client_ca": Path("/ca")}
    assert AdminSettings(enabled=True, host="0.0.0.0", **tls).client_ca == Path("/ca")


async def test_an_unreadable_tokens_file_stops_the_start(gateway: Gateway, tmp_path: Path) -> None:
    with pytest.raises(OSError, match=r"admin\.tokens_file = .* cannot be read"):
        async with running_admin(gateway, tmp_path, tokens_file=tmp_path / "missing"):
            pass


# --- the description, authentication ------------------------------------------------------


async def test_openapi_is_served_without_documentation_pages(
    gateway: Gateway, tmp_path: Path
) -> None:
    async with running_admin(gateway, tmp_path) as admin, admin.client() as client:
        r = await client.get("/openapi.json")
        assert r.status_code == 200
        spec = r.json()
        assert set(spec["paths"]) == {
            "/v1/patients/{ins}",
            "/v1/patients/bulk",
            "/v1/queues",
        }
        assert spec["security"] == [{"mutualTLS": [], "bearerAuth": []}]
        schemas = spec["components"]["schemas"]
        assert schemas["BulkRequest"]["properties"]["items"]["maxItems"] == 10_000
        assert {"PutItem", "PatchItem", "Problem", "FieldError"} <= set(schemas)
        # No Swagger UI or ReDoc: they would load JavaScript from CDNs.
        for page in ("/docs", "/redoc", "/docs/oauth2-redirect"):
            assert problem_type(await client.get(page)) == "not-found"


async def test_a_client_without_certificate_is_refused_in_the_handshake(
    gateway: Gateway, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_admin(gateway, tmp_path) as admin:
        with caplog.at_level(logging.INFO, logger="mssante.admin"):
            async with admin.client(cert=None) as client:
                with pytest.raises(httpx.TransportError):
                    await client.get("/v1/queues")
        # Refused by TLS: no request ever reached the application.
        assert not [r for r in caplog.records if r.name == "mssante.admin"]


async def test_a_certificate_from_another_ca_is_refused_in_the_handshake(
    gateway: Gateway, tmp_path: Path
) -> None:
    rogue = Pki(tmp_path / "rogue", prefix="ROGUE")
    impostor = rogue.issue("impostor", f"CN={INSURER_CN},O=Assurance Maladie TEST,C=FR")
    async with running_admin(gateway, tmp_path) as admin:
        async with admin.client(cert=impostor) as client:
            with pytest.raises(httpx.TransportError):
                await client.get("/v1/queues")
        async with admin.client() as client:  # the real one still gets in
            assert (await client.get("/v1/queues")).status_code == 200


async def test_a_missing_or_wrong_token_is_401(gateway: Gateway, tmp_path: Path) -> None:
    async with running_admin(gateway, tmp_path) as admin:
        async with admin.client(token=None) as client:
            r = await client.get(f"/v1/patients/{demo.ACTIVATED}")
            assert (r.status_code, problem_type(r)) == (401, "unauthenticated")
            assert r.headers["www-authenticate"] == 'Bearer realm="mssante-admin"'
            assert "ins" not in r.text and demo.ACTIVATED not in r.text
            r = await client.get("/openapi.json", headers={"authorization": "Basic eDp5"})
            assert (r.status_code, problem_type(r)) == (401, "unauthenticated")
        async with admin.client(token=admin.token + "x") as client:
            r = await client.get("/no/such/path")  # refused before routing: no probing
            assert (r.status_code, problem_type(r)) == (401, "invalid-token")
            assert 'error="invalid_token"' in r.headers["www-authenticate"]


async def test_new_token_command_and_revocation_without_restart(
    gateway: Gateway, tmp_path: Path
) -> None:
    async with running_admin(gateway, tmp_path) as admin:
        result = CliRunner().invoke(
            main, ["admin", "new-token", "--tokens-file", str(admin.tokens_file)]
        )
        assert result.exit_code == 0, result.output
        token = result.stdout.strip()
        assert token not in admin.tokens_file.read_text()  # only its hash is kept
        async with admin.client(token=token) as client:
            assert (await client.get("/v1/queues")).status_code == 200
            kept = [line for line in admin.tokens_file.read_text().splitlines() if line.strip()][
                :-1
            ]
            admin.tokens_file.write_text("\n".join(kept) + "\n")
            r = await client.get("/v1/queues")
            assert (r.status_code, problem_type(r)) == (401, "invalid-token")
        async with admin.client() as client:  # the first token is still listed
            assert (await client.get("/v1/queues")).status_code == 200


async def test_sighup_reloads_the_server_certificate(gateway: Gateway, tmp_path: Path) -> None:
    async def served_serial(admin: AdminApi) -> int:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", admin.server.port, ssl=admin.tls(admin.insurer)
        )
        try:
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            return x509.load_der_x509_certificate(der).serial_number
        finally:
            writer.close()
            await writer.wait_closed()

    async with running_admin(gateway, tmp_path) as admin:
        first = await served_serial(admin)
        renewed = admin.pki.issue("admin-server", "CN=127.0.0.1,O=Admin TEST,C=FR", server=True)
        assert admin.server.reload_certificate()
        assert await served_serial(admin) == renewed.cert.serial_number != first
        renewed.key_path.write_text("not a key")
        assert not admin.server.reload_certificate()  # the renewed one stays
        assert await served_serial(admin) == renewed.cert.serial_number


# --- changes ------------------------------------------------------------------------------


async def test_create_then_replace_a_patient(gateway: Gateway, tmp_path: Path) -> None:
    async with running_admin(gateway, tmp_path) as admin, admin.client() as client:
        record = {
            "status": "created",
            "insurer_email": "Nadia.Haddad@Example.ORG",
            "given_name": " Nadia ",
            "family_name": "Haddad",
            "birth_date": "1990-02-01",
            "postal_address": ADDRESS,
        }
        r = await client.put(f"/v1/patients/{NEW}", json=record)
        assert r.status_code == 201, r.text
        view = r.json()
        assert view["status"] == "created"
        assert view["insurer_email"] == "Nadia.Haddad@example.org"  # domain normalised
        assert view["given_name"] == "Nadia"
        assert view["postal_address"] == ADDRESS
        assert view["notification_channel"] == "email"
        assert view["activated_at"] is None and view["webmail_password"] is False
        assert (await patient(gateway, NEW)).postal_address == "\n".join(ADDRESS)
        [created] = await admin.events(r.headers["x-request-id"])
        assert created.kind == "patient.created"
        assert created.actor.startswith(f"admin:{INSURER_CN}/token-")

        # The same again: nothing changes, nothing is audited.
        r = await client.put(f"/v1/patients/{NEW}", json=record)
        assert r.status_code == 200
        assert await admin.events(r.headers["x-request-id"]) == []

        # PUT replaces: what is left out becomes empty.
        r = await client.put(f"/v1/patients/{NEW}", json={"status": "created"})
        assert r.status_code == 200
        view = r.json()
        assert view["insurer_email"] is None and view["postal_address"] is None
        assert view["notification_channel"] == "postal"
        [updated] = await admin.events(r.headers["x-request-id"])
        assert updated.kind == "patient.updated"
        assert updated.details["fields"] == [
            "insurer_email",
            "given_name",
            "family_name",
            "birth_date",
            "postal_address",
        ]


async def test_activation_needs_the_activation_address_and_revokes_codes(
    gateway: Gateway, tmp_path: Path
) -> None:
    pid = await patient_id(gateway, demo.CREATED_EMAIL)
    await credentials.issue_activation_code(
        gateway.store, pid, at=gateway.clock.now(), channel=Channel.EMAIL
    )
    async with running_admin(gateway, tmp_path) as admin, admin.client() as client:
        url = f"/v1/patients/{demo.CREATED_EMAIL}"
        r = await client.patch(url, json={"status": "activated"})
        assert (r.status_code, problem_type(r)) == (422, "activation-email-required")
        assert r.json()["errors"] == [
            {"detail": r.json()["detail"], "pointer": "#/activation_email"}
        ]
        assert (await patient(gateway, demo.CREATED_EMAIL)).status is ProfileStatus.CREATED

        r = await client.patch(
            url, json={"status": "activated", "activation_email": "Jean.Dupont@Example.org"}
        )
        assert r.status_code == 200, r.text
        view = r.json()
        assert view["status"] == "activated"
        # Lower-case: the webmail logs in by it.
        assert view["activation_email"] == "jean.dupont@example.org"
        assert view["activated_at"] is not None
        [code] = await codes(gateway, pid)
        assert code.revoked_at is not None  # a later re-creation must not revive it
        kinds = [e.kind for e in await admin.events(r.headers["x-request-id"])]
        assert kinds == ["patient.activated", "patient.updated"]

        # "Activated" means the patient logged in: it is not undone.
        r = await client.patch(url, json={"status": "created"})
        assert (r.status_code, problem_type(r)) == (409, "status-change-refused")
        # Nor can the address an activated profile is notified at be cleared.
        r = await client.patch(url, json={"activation_email": None})
        assert (r.status_code, problem_type(r)) == (422, "activation-email-required")


async def test_opposition_ends_web_sessions_and_the_gateway_refuses_mail(
    gateway: Gateway, tmp_path: Path
) -> None:
    """End to end: opposed through the API, the next RCPT is refused (DOMAIN.md 3)."""
    minor = await patient_id(gateway, demo.MINOR)
    adult = await patient_id(gateway, demo.ACTIVATED)
    await credentials.issue_activation_code(
        gateway.store, minor, at=gateway.clock.now(), channel=Channel.POSTAL
    )
    own = await add_web_session(gateway, minor)
    as_representative = await add_web_session(gateway, adult, acting_for=minor)
    unrelated = await add_web_session(gateway, adult)
    assert (await rcpt_reply(gateway, addr(demo.MINOR)))[0] == replies.RECIPIENT_OK.code

    async with running_admin(gateway, tmp_path) as admin, admin.client() as client:
        r = await client.patch(f"/v1/patients/{demo.MINOR}", json={"status": "opposed"})
        assert r.status_code == 200, r.text
        assert r.json()["notification_channel"] is None

    # Its own session and its representative's reading it end; others stay.
    assert await web_sessions(gateway) == {unrelated}
    assert own != as_representative
    [code] = await codes(gateway, minor)
    assert code.revoked_at is not None
    [event] = await admin.events(r.headers["x-request-id"])
    assert (event.kind, event.details["from"], event.details["to"]) == (
        "patient.status_changed",
        "created",
        "opposed",
    )
    assert (event.details["sessions_ended"], event.details["codes_revoked"]) == (2, 1)
    code_, text = await rcpt_reply(gateway, addr(demo.MINOR))
    expected = replies.MAILBOX_CLOSED
    assert (code_, text) == (expected.code, f"{expected.enhanced} {expected.text}")


async def test_closure_then_re_creation(gateway: Gateway, tmp_path: Path) -> None:
    async with running_admin(gateway, tmp_path) as admin, admin.client() as client:
        url = f"/v1/patients/{demo.ACTIVATED}"
        r = await client.patch(url, json={"status": "closed"})
        assert r.status_code == 200
        [closed] = await admin.events(r.headers["x-request-id"])
        assert (closed.kind, closed.details["from"]) == ("mailbox.closed", "activated")
        assert (await rcpt_reply(gateway, addr(demo.ACTIVATED)))[0] == 550

        # Re-created (the patient withdrew the closure): mail is accepted again and
        # the profile waits for a new activation.
        r = await client.patch(url, json={"status": "created"})
        assert r.status_code == 200
        assert r.json()["status"] == "created"
        assert r.json()["activated_at"] is not None  # the first activation is history
        [recreated] = await admin.events(r.headers["x-request-id"])
        assert (recreated.kind, recreated.details["to"]) == ("patient.status_changed", "created")
        assert (await rcpt_reply(gateway, addr(demo.ACTIVATED)))[0] == 250


async def test_email_and_postal_address_changes(gateway: Gateway, tmp_path: Path) -> None:
    async def mark_bounced(session: Any) -> None:
        found = await session.scalar(select(Patient).where(Patient.ins == demo.CREATED_EMAIL))
        found.email_invalid = True

    await gateway.store.writer.run(mark_bounced)
    async with running_admin(gateway, tmp_path) as admin, admin.client() as client:
        url = f"/v1/patients/{demo.CREATED_EMAIL}"
        before = (await client.get(url)).json()
        assert (before["email_invalid"], before["notification_channel"]) == (True, "postal")

        r = await client.patch(url, json={"insurer_email": "jd@example.net"})
        view = r.json()
        assert (view["insurer_email"], view["email_invalid"]) == ("jd@example.net", False)
        assert view["notification_channel"] == "email"
        assert view["given_name"] == before["given_name"]  # a patch leaves the rest

        r = await client.patch(url, json={"postal_address": ["Jean Dupont", "", "1 quai Z"]})
        assert r.json()["postal_address"] == ["Jean Dupont", "1 quai Z"]
        [event] = await admin.events(r.headers["x-request-id"])
        assert (event.kind, event.details["fields"]) == ("patient.updated", ["postal_address"])

        r = await client.patch(url, json={"insurer_email": None})
        assert r.json()["notification_channel"] == "postal"

        for bad in (
            {"insurer_email": "not an address"},
            {"postal_address": ["line\nbreak"]},
            {"postal_address": "one string"},
            {"given_name": "x" * 201},
            {"birth_date": 631152000},
            {"status": None},
            {"statut": "opposed"},
        ):
            r = await client.patch(url, json=bad)
            assert (r.status_code, problem_type(r)) == (422, "invalid-request"), bad
            [key] = bad
            assert r.json()["errors"][0]["pointer"].startswith(f"#/{key}"), r.text


async def test_an_invalid_ins_is_422_naming_the_field(gateway: Gateway, tmp_path: Path) -> None:
    bad_key = NEW[:13] + f"{(int(NEW[13:]) % 97) + 1:02d}"
    async with running_admin(gateway, tmp_path) as admin, admin.client() as client:
        for method in ("GET", "PUT", "PATCH"):
            r = await client.request(method, f"/v1/patients/{bad_key}", json={"status": "created"})
            assert (r.status_code, problem_type(r)) == (422, "invalid-request")
            assert r.json()["errors"] == [
                {"detail": "not a valid INS: key does not match", "parameter": "ins"}
            ]
        r = await client.get("/v1/patients/12345")
        assert r.json()["errors"][0]["detail"] == "not a valid INS: 5 characters, expected 15"
    async with gateway.store.reads() as session:
        assert await session.scalar(select(Patient).where(Patient.ins == bad_key)) is None


async def test_an_unknown_patient_is_404(gateway: Gateway, tmp_path: Path) -> None:
    async with running_admin(gateway, tmp_path) as admin, admin.client() as client:
        for method in ("GET", "PATCH"):
            r = await client.request(method, f"/v1/patients/{NEW}", json={"status": "closed"})
            assert (r.status_code, problem_type(r)) == (404, "patient-not-found")
        # PATCH never creates.
        async with gateway.store.reads() as session:
            assert await session.scalar(select(Patient).where(Patient.ins == NEW)) is None


# --- bulk ---------------------------------------------------------------------------------


async def test_a_bulk_applies_its_valid_items_and_reports_the_others(
    gateway: Gateway, tmp_path: Path
) -> None:
    items: list[Any] = [
        {"op": "put", "ins": NEW, "status": "created", "postal_address": ADDRESS},
        {"op": "patch", "ins": demo.CREATED_POSTAL, "status": "opposed"},
        {"op": "patch", "ins": NEW[:14] + "0", "status": "closed"},  # bad key
        {"op": "patch", "ins": OTHER, "status": "closed"},  # unknown
        {"op": "put", "ins": OTHER, "status": "activated"},  # no activation address
        {"op": "replace", "ins": OTHER},
        "not an object",
        {"op": "patch", "ins": demo.ACTIVATED, "status": "created"},  # refused transition
        {"op": "patch", "ins": demo.CLOSED, "status": "closed"},  # already
        {"op": "patch", "ins": NEW, "insurer_email": "nh@example.org"},  # after item 0
    ]
    async with running_admin(gateway, tmp_path) as admin, admin.client() as client:
        r = await client.post("/v1/patients/bulk", json={"items": items})
        assert r.status_code == 200, r.text
        body = r.json()
        results = body["results"]
        assert [(x["index"], x["status"], x["outcome"]) for x in results] == [
            (0, 201, "created"),
            (1, 200, "updated"),
            (2, 422, "invalid"),
            (3, 404, "refused"),
            (4, 422, "refused"),
            (5, 422, "invalid"),
            (6, 422, "invalid"),
            (7, 409, "refused"),
            (8, 200, "unchanged"),
            (9, 200, "updated"),
        ]
        assert body["counts"] == {
            "created": 1,
            "updated": 2,
            "invalid": 3,
            "refused": 3,
            "unchanged": 1,
        }
        assert results[2]["problem"]["errors"] == [
            {"detail": "not a valid INS: key does not match", "pointer": "#/items/2/ins"}
        ]
        assert "ins" not in results[2]  # not valid, not echoed
        assert results[4]["problem"]["errors"][0]["pointer"] == "#/items/4/activation_email"
        assert results[6]["problem"]["errors"][0]["pointer"] == "#/items/6"
        assert results[3]["problem"]["type"] == Kind.PATIENT_NOT_FOUND.type

        created = await patient(gateway, NEW)
        assert (created.status, created.insurer_email) == (ProfileStatus.CREATED, "nh@example.org")
        assert (await patient(gateway, demo.CREATED_POSTAL)).status is ProfileStatus.OPPOSED
        assert (await patient(gateway, demo.ACTIVATED)).status is ProfileStatus.ACTIVATED
        events = await admin.events(r.headers["x-request-id"])
        assert [(e.kind, e.details["item"]) for e in events] == [
            ("patient.created", 0),
            ("patient.status_changed", 1),
            ("patient.updated", 9),
        ]


async def test_a_bulk_over_max_bulk_or_a_body_too_large_is_413(
    gateway: Gateway, tmp_path: Path
) -> None:
    async with running_admin(gateway, tmp_path, max_bulk=3) as admin, admin.client() as client:
        items = [{"op": "patch", "ins": demo.CLOSED, "status": "closed"}] * 4
        r = await client.post("/v1/patients/bulk", json={"items": items})
        assert (r.status_code, problem_type(r)) == (413, "too-many-items")
        assert (
            await client.post("/v1/patients/bulk", json={"items": items[:3]})
        ).status_code == 200
        r = await client.post("/v1/patients/bulk", json={"items": []})
        assert (r.status_code, problem_type(r)) == (422, "invalid-request")

        # 64 KiB + 3 items of 2 KiB: announced, or found while reading a chunked body.
        big = json.dumps({"items": items[:3], "padding": "x" * 100_000}).encode()
        r = await client.post(
            "/v1/patients/bulk", content=big, headers={"content-type": "application/json"}
        )
        assert (r.status_code, problem_type(r)) == (413, "body-too-large")

        async def chunks() -> Any:
            for start in range(0, len(big), 16_384):
                yield big[start : start + 16_384]

        r = await client.post(
            "/v1/patients/bulk", content=chunks(), headers={"content-type": "application/json"}
        )
        assert (r.status_code, problem_type(r)) == (413, "body-too-large")
        r = await client.put(f"/v1/patients/{NEW}", content=b"status=created")
        assert (r.status_code, problem_type(r)) == (415, "unsupported-media-type")


async def test_a_database_failure_is_503_and_a_bulk_says_what_was_not_applied(
    gateway: Gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = gateway.store.writer
    real_run = writer.run
    calls = 0

    async def failing_from_the_second(job: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls >= 2:
            raise OperationalError("BEGIN", {}, ConnectionResetError("server closed"))
        return await real_run(job)

    statuses = [demo.CREATED_EMAIL, demo.CREATED_POSTAL, demo.MINOR, demo.CORSICAN]
    items = [{"op": "patch", "ins": ins, "status": "closed"} for ins in statuses]
    async with running_admin(gateway, tmp_path) as admin, admin.client() as client:
        monkeypatch.setattr(admin_api, "BULK_CHUNK", 2)
        monkeypatch.setattr(writer, "run", failing_from_the_second)
        r = await client.post("/v1/patients/bulk", json={"items": items})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["outcome"] for x in results] == ["updated"] * 2 + ["not_applied"] * 2
        assert results[3]["problem"]["type"] == Kind.UNAVAILABLE.type
        assert results[3]["problem"]["log_id"] == r.headers["x-request-id"]

        r = await client.patch(f"/v1/patients/{demo.CORSICAN}", json={"status": "closed"})
        assert (r.status_code, problem_type(r)) == (503, "database-unavailable")
        assert r.json()["log_id"] == r.headers["x-request-id"]
    monkeypatch.undo()
    closed = [(await patient(gateway, ins)).status for ins in statuses]
    assert closed == [ProfileStatus.CLOSED] * 2 + [ProfileStatus.CREATED, ProfileStatus.ACTIVATED]


# --- reading ------------------------------------------------------------------------------


async def test_queue_state_reflects_the_rows(
    gateway: Gateway, tmp_path: Path, clock: FakeClock
) -> None:
    async with running_admin(gateway, tmp_path) as admin, admin.client() as client:
        empty = (await client.get("/v1/queues")).json()
        assert empty["outbound"]["pending"] == {"count": 0, "oldest_age_seconds": None}
        assert empty["notifications"]["email"]["pending"]["count"] == 0

        # A message for a created profile with an insurer address, one for a
        # profile known only by post: two notifications waiting for the worker.
        msg = professional_message([addr(demo.CREATED_EMAIL), addr(demo.CREATED_POSTAL)])
        errors, _ = await send(gateway, msg)
        assert not errors
        prepared = await gateway.store.outbound.prepare(b"Subject: x\r\n\r\nx\r\n")

        async def queue_reply(session: Any) -> None:
            await gateway.store.outbound.add(
                session,
                prepared,
                kind=OutboundKind.REPLY,
                mail_from=addr(demo.ACTIVATED),
                recipients=["a@chu-exemple.mssante.fr", "b@chu-exemple.mssante.fr"],
                at=clock.now(),
            )

        await gateway.store.writer.run(queue_reply)
        clock.advance(seconds=90)
        state = (await client.get("/v1/queues")).json()
        assert state["outbound"]["pending"] == {"count": 2, "oldest_age_seconds": 90.0}
        assert state["outbound"]["held"]["count"] == 0
        assert state["notifications"]["email"]["pending"] == {
            "count": 1,
            "oldest_age_seconds": 90.0,
        }
        assert state["notifications"]["postal"]["pending"]["count"] == 1

        view = (await client.get(f"/v1/patients/{demo.CREATED_EMAIL}")).json()
        assert view["notifications"] == {"pending": 1, "failed": 0}


# --- audit and logs -----------------------------------------------------------------------


async def test_audit_events_carry_the_request_id_and_the_chain_verifies(
    gateway: Gateway, tmp_path: Path
) -> None:
    async with running_admin(gateway, tmp_path) as admin:
        async with admin.client(headers={"x-request-id": "crm-2026-11-23.0001"}) as client:
            r = await client.patch(f"/v1/patients/{demo.CREATED_EMAIL}", json={"status": "closed"})
            assert r.headers["x-request-id"] == "crm-2026-11-23.0001"
        for unsafe in ("short", "has space in it", "x" * 65, "path/../../etc/x"):
            async with admin.client(headers={"x-request-id": unsafe}) as client:
                r = await client.get("/v1/queues")
                assert r.headers["x-request-id"] != unsafe
                assert len(r.headers["x-request-id"]) == 32
    [event] = await admin.events("crm-2026-11-23.0001")
    assert event.kind == "mailbox.closed"
    assert event.actor.startswith(f"admin:{INSURER_CN}/token-")
    async with gateway.store.reads() as session:
        count, problems = await audit.verify_stored_chain(session)
        assert problems == [] and count > 0
        assert await session.scalar(select(AuditEvent).where(AuditEvent.id == event.id))


async def test_admin_actions_log_one_line_each_without_identity(
    gateway: Gateway, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secrets_ = [NEW, demo.CREATED_EMAIL, "nadia.haddad@example.org", "Haddad", "Bordeaux"]
    with caplog.at_level(logging.INFO):
        async with running_admin(gateway, tmp_path) as admin, admin.client() as client:
            put = await client.put(
                f"/v1/patients/{NEW}",
                json={
                    "status": "created",
                    "insurer_email": "nadia.haddad@example.org",
                    "family_name": "Haddad",
                    "postal_address": ADDRESS,
                },
            )
            bulk = await client.post(
                "/v1/patients/bulk",
                json={"items": [{"op": "patch", "ins": demo.CREATED_EMAIL, "status": "closed"}]},
            )
            missing = await client.get(f"/v1/patients/{OTHER}")
    lines = [r for r in caplog.records if r.name == "mssante.admin"]
    assert [r.fields["correlation_id"] for r in lines] == [  # type: ignore[attr-defined]
        put.headers["x-request-id"],
        bulk.headers["x-request-id"],
        missing.headers["x-request-id"],
    ]
    fields = [r.fields for r in lines]  # type: ignore[attr-defined]
    assert fields[0]["event"] == "admin.action"
    assert (fields[0]["action"], fields[0]["outcome"], fields[0]["status"]) == (
        "patient.put",
        "created",
        201,
    )
    assert fields[0]["patient"] == gateway.pseudonym(NEW)
    assert fields[0]["actor"].startswith(f"admin:{INSURER_CN}/token-")
    assert (fields[1]["action"], fields[1]["count"], fields[1]["counts"]) == (
        "patient.bulk",
        1,
        {"updated": 1},
    )
    assert (fields[2]["outcome"], fields[2]["status"]) == ("patient-not-found", 404)
    # Everything the server side logged (httpx, the test's client, logs its URLs).
    server = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    assert any(r.name.startswith("uvicorn") for r in server)  # its own lines are checked too
    everything = " ".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in server)
    for secret in secrets_:
        assert secret.lower() not in everything.lower()


async def test_an_internal_error_is_a_problem_with_a_log_id(
    gateway: Gateway,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = f"queue of {demo.ACTIVATED}"

    async def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError(secret)

    async with running_admin(gateway, tmp_path) as admin, admin.client() as client:
        monkeypatch.setattr(admin_api, "queue_state", broken)
        with caplog.at_level(logging.INFO, logger="mssante.admin"):
            r = await client.get("/v1/queues")
            assert (r.status_code, problem_type(r)) == (500, "internal-error")
            log_id = r.json()["log_id"]
            assert log_id == r.headers["x-request-id"]
            for leak in (secret, "RuntimeError", "Traceback"):
                assert leak not in r.text
            traces = [rec for rec in caplog.records if rec.exc_info]
            assert len(traces) == 1 and log_id in traces[0].getMessage()
            monkeypatch.undo()
            # The same connection goes on.
            assert (await client.get("/v1/queues")).status_code == 200


@pytest.mark.parametrize("role", [Role.WEB, Role.GATEWAY])
async def test_the_web_role_serves_the_admin_api_from_the_gateway_wiring(
    data_dir: Path, db_url: str, clock: FakeClock, tmp_path: Path, role: Role
) -> None:
    """`mssante serve --role web` (and all) starts the admin API with the
    webmail; a gateway-only process does not."""
    token = secrets.token_urlsafe(32)
    tokens = tmp_path / "tokens"
    tokens.write_text(token_hash(token) + "\n")
    settings = make_settings(data_dir, database_url=db_url).model_copy(
        update={"admin": AdminSettings(enabled=True, port=0, tokens_file=tokens)}
    )
    gw = Gateway(settings, clock=clock, roles={role})
    await gw.start()
    try:
        if role is Role.GATEWAY:
            assert gw.admin is None
            return
        assert gw.admin is not None
        headers = {"authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=gw.admin.url, headers=headers) as client:
            r = await client.get("/v1/queues")
            assert r.status_code == 200, r.text
    finally:
        await gw.stop()
