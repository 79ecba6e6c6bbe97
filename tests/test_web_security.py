"""The webmail's security list (issue 8.9), over real HTTPS with a real client.

Each test runs the gateway and its webmail (tests/webmail.py) on both
databases and talks to it like a browser would: httpx with one cookie jar
per browser.  What "changes nothing" means is checked on the database
itself: every table of the schema, and the notification outbox.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import html
import logging
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import date
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest
from sqlalchemy import delete, select

from mssante import demo
from mssante.routing.ins import with_key
from mssante.store import credentials
from mssante.store import mailbox as mailbox_store
from mssante.store.models import (
    Base,
    Delivery,
    OutboundMessage,
    PatientLink,
    ProfileStatus,
    WebSession,
)
from mssante.web.auth import ACTIVATION_FAILED, LOCKED, LOGIN_FAILED
from mssante.web.security import HSTS
from tests.conftest import FakeClock
from tests.test_gateway import DOCTOR, addr
from tests.webmail import Webmail, csrf_of, login, post_form, running_webmail

# A second professional, so that one patient has two conversations.
CARDIO = "dr.bernard@chu-exemple.mssante.fr"
# A well-formed INS (its key is right) that belongs to nobody.
UNKNOWN_INS = with_key("1990599123999")
CAMILLE_EMAIL = "camille.martin@example.org"  # demo.ACTIVATED's login address
NEW_PASSWORD = "cheval-agrafe-Correct-42"  # accepted by password_problems
PDF = b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\ntrailer<<>>\n%%EOF\n"
EVIL = "https://evil.example"
NOWHERE = 987_654  # an id no table holds


# --- helpers ---------------------------------------------------------------------------


def pro_message(
    ins: str,
    *,
    sender: str = DOCTOR,
    name: str = "Dr Alice Durand",
    subject: str = "Compte rendu",
    body: str = "Bonjour",
    attachments: list[tuple[bytes, str, str, str]] | None = None,
) -> EmailMessage:
    """A professional's message; ``attachments``: (data, maintype, subtype, file name)."""
    msg = EmailMessage()
    msg["From"] = f"{name} <{sender}>"
    msg["To"] = addr(ins)
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain="chu-exemple.mssante.fr")
    msg.set_content(body)
    for data, maintype, subtype, filename in attachments or []:
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg


async def deliver(wm: Webmail, ins: str, *, sender: str = DOCTOR, **kwargs: Any) -> None:
    await wm.deliver_message(pro_message(ins, sender=sender, **kwargs), sender=sender)


async def patient_id(wm: Webmail, ins: str) -> int:
    return (await wm.patient(ins)).id


async def deliveries(wm: Webmail, ins: str) -> list[Delivery]:
    pid = await patient_id(wm, ins)
    async with wm.gateway.store.reads() as s:
        rows = await s.scalars(
            select(Delivery).where(Delivery.patient_id == pid).order_by(Delivery.id)
        )
        return list(rows)


async def snapshot(wm: Webmail) -> dict[str, Any]:
    """Every row of every table, and the e-mails sent: what a refused POST must not change."""
    out: dict[str, Any] = {}
    async with wm.gateway.store.reads() as s:
        for table in Base.metadata.sorted_tables:
            rows = (await s.execute(select(table))).all()
            out[table.name] = sorted((tuple(r) for r in rows), key=repr)
    out["outbox"] = sorted(p.name for p in wm.outbox.glob("*")) if wm.outbox.exists() else []
    return out


async def outbound_count(wm: Webmail) -> int:
    async with wm.gateway.store.reads() as s:
        return len(list(await s.scalars(select(OutboundMessage.id))))


async def session_rows(wm: Webmail) -> list[WebSession]:
    async with wm.gateway.store.reads() as s:
        return list(await s.scalars(select(WebSession)))


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def set_cookies(response: httpx.Response) -> dict[str, str]:
    """Set-Cookie headers of a response by cookie name (the whole header line)."""
    out = {}
    for line in response.headers.get_list("set-cookie"):
        out[line.split("=", 1)[0]] = line
    return out


def cookie_attributes(line: str) -> tuple[str, dict[str, str]]:
    """(value, {lower-case attribute: value}) of one Set-Cookie header."""
    first, *attrs = [p.strip() for p in line.split(";")]
    value = first.split("=", 1)[1]
    parsed = {}
    for attr in attrs:
        key, _, val = attr.partition("=")
        parsed[key.lower()] = val
    return value, parsed


def totp_now(secret: str, clock: FakeClock) -> str:
    return pyotp.TOTP(secret).at(clock.now())


SECRET = re.compile(r'class="secret">([A-Z2-7 ]+)<')


def shown_secret(page: str) -> str:
    found = SECRET.search(page)
    assert found, "no TOTP secret on the page"
    return found.group(1).replace(" ", "")


def shown(page: str) -> str:
    """The text a reader sees: no tags, entities decoded, spaces collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]*>", " ", page)).split())


@contextlib.asynccontextmanager
async def logged_in(wm: Webmail, ins: str = demo.ACTIVATED) -> AsyncIterator[httpx.AsyncClient]:
    """A browser logged in as ``ins``."""
    async with wm.client() as client:
        r = await login(client, ins)
        assert r.status_code == 303, r.text
        assert r.headers["location"] == "/messages"
        yield client


# --- patient A cannot reach patient B's mailbox ----------------------------------------


@dataclass
class TwoMailboxes:
    own_conv: int
    own_delivery: int
    other_conv: int  # B's conversation in B's mailbox
    other_delivery: int  # its delivery (with a PDF)
    other_trashed_conv: int  # B's conversation in B's trash


async def two_mailboxes(wm: Webmail) -> TwoMailboxes:
    pdf = [(PDF, "application", "pdf", "cr.pdf")]
    await deliver(wm, demo.ACTIVATED, attachments=pdf)
    await deliver(wm, demo.CORSICAN, subject="Bilan de B", body="corps de B", attachments=pdf)
    await deliver(wm, demo.CORSICAN, sender=CARDIO, name="Dr Bernard", subject="Holter de B")
    [own_conv] = await wm.conversations(demo.ACTIVATED)
    [own] = await deliveries(wm, demo.ACTIVATED)
    other_conv, trashed_conv = await wm.conversations(demo.CORSICAN)
    other = [d for d in await deliveries(wm, demo.CORSICAN) if d.conversation_id == other_conv]
    moved = await mailbox_store.trash(
        wm.gateway.store,
        await patient_id(wm, demo.CORSICAN),
        at=wm.clock.now(),
        conversation_id=trashed_conv,
    )
    assert moved == 1
    return TwoMailboxes(own_conv, own.id, other_conv, other[0].id, trashed_conv)


async def same_as_missing(
    wm: Webmail, client: httpx.AsyncClient, method: str, url: str, missing_url: str, **kw: Any
) -> None:
    """``url`` (someone else's id) answers exactly as ``missing_url`` (no such id): 404."""
    before = await snapshot(wm)
    theirs = await client.request(method, url, **kw)
    missing = await client.request(method, missing_url, **kw)
    assert theirs.status_code == missing.status_code == 404, (url, theirs.status_code)
    assert theirs.text == missing.text
    assert "Page introuvable" in theirs.text
    assert await snapshot(wm) == before, f"{method} {url} changed the database"


async def test_other_patients_ids_answer_like_missing_ones(
    data_dir: Path, db_url: str, clock: FakeClock
) -> None:
    """Issue 8.9: A changes ids in URLs and forms; B's objects stay out of reach."""
    async with running_webmail(data_dir, db_url, clock) as wm:
        ids = await two_mailboxes(wm)
        async with logged_in(wm) as a:
            page = await a.get("/messages")
            token = csrf_of(page.text)
            form = {"csrf": token, "message": "Je lis votre dossier."}
            c, d, t = ids.other_conv, ids.other_delivery, ids.other_trashed_conv
            n = NOWHERE
            await same_as_missing(wm, a, "GET", f"/conversations/{c}", f"/conversations/{n}")
            await same_as_missing(
                wm, a, "GET", f"/conversations/{t}?corbeille=1", f"/conversations/{n}?corbeille=1"
            )
            await same_as_missing(
                wm, a, "GET", f"/messages/{d}/pieces-jointes/1", f"/messages/{n}/pieces-jointes/1"
            )
            for action in ("repondre", "corbeille"):
                await same_as_missing(
                    wm,
                    a,
                    "POST",
                    f"/conversations/{c}/{action}",
                    f"/conversations/{n}/{action}",
                    data=form,
                )
            await same_as_missing(
                wm,
                a,
                "POST",
                f"/conversations/{t}/restaurer",
                f"/conversations/{n}/restaurer",
                data=form,
            )
            await same_as_missing(
                wm, a, "POST", f"/messages/{d}/corbeille", f"/messages/{n}/corbeille", data=form
            )
            # /profil with B's id: B is no profile of A's.
            b_id = await patient_id(wm, demo.CORSICAN)
            await same_as_missing(
                wm, a, "POST", "/profil", "/profil", data={"csrf": token, "patient": str(b_id)}
            )
            # A's history tells nothing of B's mailbox.
            history = shown((await a.get("/historique")).text)
            assert "Dr Bernard" not in history and "de B" not in history

            # The same routes work on A's own ids: the 404s above are not a broken route.
            assert (await a.get(f"/conversations/{ids.own_conv}")).status_code == 200
            download = await a.get(f"/messages/{ids.own_delivery}/pieces-jointes/1")
            assert download.status_code == 200 and download.content == PDF
            r = await a.post(f"/conversations/{ids.own_conv}/repondre", data=form)
            assert r.status_code == 303
            r = await a.post(f"/messages/{ids.own_delivery}/corbeille", data=form)
            assert r.status_code == 303
            r = await a.post(f"/conversations/{ids.own_conv}/restaurer", data=form)
            assert r.status_code == 303
            r = await a.post(f"/conversations/{ids.own_conv}/corbeille", data=form)
            assert r.status_code == 303
        # B's mailbox is as it was: nothing read, replied, trashed or restored.
        b_rows = await deliveries(wm, demo.CORSICAN)
        assert [(r.read_at, r.trashed_at is None) for r in b_rows] == [(None, True), (None, False)]


async def test_representative_needs_the_link(data_dir: Path, db_url: str, clock: FakeClock) -> None:
    """Issue 8.9: only a linked legal representative opens a minor's mailbox."""
    async with running_webmail(data_dir, db_url, clock) as wm:
        await deliver(wm, demo.MINOR, subject="Vaccins de Lucas", body="Rappel DTP")
        [minor_conv] = await wm.conversations(demo.MINOR)
        minor_id = await patient_id(wm, demo.MINOR)
        adult_id = await patient_id(wm, demo.ACTIVATED)

        # demo.CORSICAN is not linked to the minor.
        async with logged_in(wm, demo.CORSICAN) as stranger:
            token = csrf_of((await stranger.get("/messages")).text)
            for wanted in (minor_id, adult_id):
                await same_as_missing(
                    wm,
                    stranger,
                    "POST",
                    "/profil",
                    "/profil",
                    data={"csrf": token, "patient": str(wanted)},
                )
            missing = await stranger.post("/profil", data={"csrf": token, "patient": str(NOWHERE)})
            assert missing.status_code == 404
            await same_as_missing(
                wm, stranger, "GET", f"/conversations/{minor_conv}", f"/conversations/{NOWHERE}"
            )
            assert "Vaccins de Lucas" not in (await stranger.get("/messages")).text

        # demo.ACTIVATED is one of the minor's representatives.
        async with logged_in(wm) as parent:
            r = await post_form(parent, "/messages", "/profil", {"patient": str(minor_id)})
            assert r.status_code == 303
            assert r.headers["location"] == "/messages?info=profile"
            listing = shown((await parent.get("/messages")).text)
            assert "Vous consultez la messagerie de Lucas Martin" in listing
            assert "Vaccins de Lucas" in listing
            assert (await parent.get(f"/conversations/{minor_conv}")).status_code == 200

            # The link is checked on every request: once removed, back to one's own mailbox.
            async def unlink(db: Any) -> None:
                await db.execute(delete(PatientLink).where(PatientLink.patient_id == minor_id))

            await wm.gateway.store.writer.run(unlink)
            assert (await parent.get(f"/conversations/{minor_conv}")).status_code == 404
            assert "Vaccins de Lucas" not in (await parent.get("/messages")).text


# --- CSRF ------------------------------------------------------------------------------


async def refused_then_accepted(
    wm: Webmail,
    client: httpx.AsyncClient,
    page_url: str,
    action: str,
    data: dict[str, str],
) -> httpx.Response:
    """POST ``data`` without a token, with a wrong one, with the right one from
    another site: each is refused (403) and changes nothing.  Then with the
    right token: it must change something, or the refusals proved nothing."""
    token = csrf_of((await client.get(page_url)).text)
    before = await snapshot(wm)
    attempts: list[tuple[dict[str, str], dict[str, str]]] = [
        (data, {}),
        ({"csrf": "", **data}, {}),
        ({"csrf": secrets.token_urlsafe(32), **data}, {}),
        ({"csrf": token[:-1] + ("A" if token[-1] != "A" else "B"), **data}, {}),
        ({"csrf": token, **data}, {"origin": EVIL}),
        ({"csrf": token, **data}, {"origin": "null"}),
    ]
    for form, headers in attempts:
        r = await client.post(action, data=form, headers=headers)
        assert r.status_code == 403, (action, headers, r.status_code)
        assert "Formulaire expiré" in r.text
        assert await snapshot(wm) == before, f"refused POST {action} changed the database"
    origin = wm.url
    accepted = await client.post(action, data={"csrf": token, **data}, headers={"origin": origin})
    assert accepted.status_code in (200, 303), (action, accepted.status_code, accepted.text)
    assert await snapshot(wm) != before, f"POST {action} with its token changed nothing"
    return accepted


async def test_every_post_route_requires_its_csrf_token(
    data_dir: Path, db_url: str, clock: FakeClock
) -> None:
    """Issue 8.9: every form, before and after login, carries a token checked on POST."""
    async with running_webmail(data_dir, db_url, clock) as wm:
        await deliver(wm, demo.ACTIVATED)
        await deliver(wm, demo.ACTIVATED, sender=CARDIO, name="Dr Bernard", subject="Holter")
        conv, conv2 = await wm.conversations(demo.ACTIVATED)
        first, _second = await deliveries(wm, demo.ACTIVATED)
        corsican = await patient_id(wm, demo.CORSICAN)
        minor = await patient_id(wm, demo.MINOR)
        code = await wm.issue_code(demo.CREATED_EMAIL)
        # demo.CORSICAN has the second factor on: its login stops at /connexion/code.
        secret = credentials.new_totp_secret()
        assert await credentials.enable_totp(
            wm.gateway.store, corsican, secret, totp_now(secret, clock), at=clock.now()
        )
        clock.advance(seconds=30)

        # Before login: the double-submit token.
        async with wm.client() as anonymous:
            await refused_then_accepted(
                wm,
                anonymous,
                "/connexion",
                "/connexion",
                {"identifiant": demo.ACTIVATED, "mot_de_passe": demo.PASSWORD},
            )
        async with wm.client() as activating:
            r = await refused_then_accepted(
                wm,
                activating,
                "/activation",
                "/activation",
                {
                    "ins": demo.CREATED_EMAIL,
                    "jour": "17",
                    "mois": "01",
                    "annee": "1979",
                    "code": code,
                },
            )
            assert r.headers["location"] == "/activation/adresse"
            await refused_then_accepted(
                wm,
                activating,
                "/activation/adresse",
                "/activation/adresse",
                {"email": "jean.perso@example.org"},
            )
            r = await refused_then_accepted(
                wm,
                activating,
                "/activation/confirmation",
                "/activation/confirmation",
                {
                    "code": wm.last_code("jean.perso@example.org"),
                    "mot_de_passe": NEW_PASSWORD,
                    "confirmation": NEW_PASSWORD,
                },
            )
            assert r.headers["location"] == "/messages?info=activated"

        # The second factor, then closing the mailbox, as demo.CORSICAN.
        async with wm.client() as second:
            assert (await login(second, demo.CORSICAN)).headers["location"] == "/connexion/code"
            await refused_then_accepted(
                wm, second, "/connexion/code", "/connexion/code", {"code": totp_now(secret, clock)}
            )
            await refused_then_accepted(
                wm, second, "/compte/fermer", "/compte/fermer", {"confirmation": "oui"}
            )

        # The mailbox pages, as demo.ACTIVATED.
        async with logged_in(wm) as a:
            page = f"/conversations/{conv}"
            await refused_then_accepted(
                wm, a, page, f"{page}/repondre", {"message": "Merci, à mardi."}
            )
            await refused_then_accepted(
                wm,
                a,
                "/nouveau",
                "/nouveau",
                {"conversation": str(conv2), "subject": "Question", "message": "Bonjour"},
            )
            await refused_then_accepted(wm, a, page, f"/messages/{first.id}/corbeille", {})
            await refused_then_accepted(wm, a, "/corbeille", f"{page}/restaurer", {})
            await refused_then_accepted(wm, a, page, f"{page}/corbeille", {})
            await refused_then_accepted(wm, a, "/messages", "/profil", {"patient": str(minor)})
            setup = "/compte/double-authentification"
            totp_page = (await a.get(setup)).text
            await refused_then_accepted(
                wm, a, setup, setup, {"code": totp_now(shown_secret(totp_page), clock)}
            )
            await refused_then_accepted(wm, a, setup, setup, {"action": "desactiver"})
            r = await refused_then_accepted(wm, a, "/messages", "/deconnexion", {})
            assert r.headers["location"] == "/connexion?info=logout"


async def test_login_double_submit_cookie(data_dir: Path, db_url: str, clock: FakeClock) -> None:
    """Issue 8.9: before login the token is a cookie the form repeats; both must agree."""
    async with running_webmail(data_dir, db_url, clock) as wm:
        form = {"identifiant": demo.ACTIVATED, "mot_de_passe": demo.PASSWORD}
        async with wm.client() as browser, wm.client() as other:
            page = await browser.get("/connexion")
            _value, attrs = cookie_attributes(set_cookies(page)["__Host-csrf"])
            token = csrf_of(page.text)
            assert browser.cookies["__Host-csrf"] == token
            assert {"httponly", "secure", "samesite", "path"} <= attrs.keys()
            other_token = csrf_of((await other.get("/connexion")).text)
            assert other_token != token

            # Another browser's token (valid there) does not pass here.
            r = await browser.post("/connexion", data={"csrf": other_token, **form})
            assert r.status_code == 403
            # The token without its cookie does not pass either.
            async with wm.client() as cookieless:
                r = await cookieless.post("/connexion", data={"csrf": token, **form})
                assert r.status_code == 403
            assert await session_rows(wm) == []
            # A second visit keeps the cookie: a form opened in another tab still works.
            assert csrf_of((await browser.get("/connexion")).text) == token
            r = await browser.post("/connexion", data={"csrf": token, **form})
            assert r.status_code == 303 and r.headers["location"] == "/messages"
            assert (await browser.get("/messages")).status_code == 200


async def test_login_form_token_is_the_one_checked(
    data_dir: Path, db_url: str, clock: FakeClock
) -> None:
    """Regression: the login and activation forms shown to a browser with a
    session carried the session's token, but their POST was checked against
    the anonymous cookie: "Formulaire expiré" (403) at every try for a
    half-logged-in browser going back to the login form, or a patient
    opening /activation for a relative.  And a logged-in patient who had
    opened the second-factor page was shown the login form again."""
    async with running_webmail(data_dir, db_url, clock) as wm:
        corsican = await patient_id(wm, demo.CORSICAN)
        secret = credentials.new_totp_secret()
        assert await credentials.enable_totp(
            wm.gateway.store, corsican, secret, totp_now(secret, clock), at=clock.now()
        )
        code = await wm.issue_code(demo.CREATED_EMAIL)
        async with wm.client() as browser:
            assert (await login(browser, demo.CORSICAN)).headers["location"] == "/connexion/code"
            # Not this account after all: back to the login form.
            assert (await browser.get("/connexion")).status_code == 200
            r = await login(browser, demo.ACTIVATED)
            assert r.status_code == 303 and r.headers["location"] == "/messages"
            assert "Camille Martin" in shown((await browser.get("/messages")).text)

            assert (await browser.get("/compte/double-authentification")).status_code == 200
            r = await browser.get("/connexion")
            assert r.status_code == 303 and r.headers["location"] == "/messages"

            # Activating a relative's profile from a logged-in browser.
            assert (await browser.get("/activation")).status_code == 200
            r = await activation_form(browser, demo.CREATED_EMAIL, code)
            assert r.status_code == 303 and r.headers["location"] == "/activation/adresse"


# --- session cookies -------------------------------------------------------------------


async def test_session_cookie_attributes_on_https(
    data_dir: Path, db_url: str, clock: FakeClock
) -> None:
    """RFC 6265bis: __Host- prefix, Secure, HttpOnly, SameSite=Strict, Path=/, no Domain."""
    async with running_webmail(data_dir, db_url, clock) as wm, wm.client() as client:
        r = await login(client)
        assert r.status_code == 303
        cookies = set_cookies(r)
        assert "session" not in cookies
        value, attrs = cookie_attributes(cookies["__Host-session"])
        assert len(value) >= 40
        assert "httponly" in attrs and "secure" in attrs
        assert attrs["samesite"].lower() == "strict"
        assert attrs["path"] == "/"
        assert "domain" not in attrs
        # The database keeps the token's SHA-256, never the token.
        [row] = await session_rows(wm)
        assert row.id == digest(value) and value not in (row.id, row.csrf)


async def test_cookies_and_hsts_on_plain_http(
    data_dir: Path, db_url: str, clock: FakeClock
) -> None:
    """Without TLS: no Secure, no __Host- prefix (a browser would drop them), no HSTS."""
    async with running_webmail(data_dir, db_url, clock, tls=False) as wm, wm.client() as client:
        assert wm.url.startswith("http://")
        page = await client.get("/connexion")
        assert "strict-transport-security" not in page.headers
        r = await login(client)
        assert r.status_code == 303
        assert "strict-transport-security" not in r.headers
        cookies = set_cookies(r)
        assert "__Host-session" not in cookies
        _value, attrs = cookie_attributes(cookies["session"])
        assert "secure" not in attrs and "httponly" in attrs
        assert attrs["samesite"].lower() == "strict" and attrs["path"] == "/"
        listing = await client.get("/messages")
        assert listing.status_code == 200
        assert "strict-transport-security" not in listing.headers


async def test_behind_tls_proxy_cookies_are_secure(
    data_dir: Path, db_url: str, clock: FakeClock
) -> None:
    """web.behind_tls_proxy: plain HTTP to the proxy, but Secure cookies and HSTS."""
    async with (
        running_webmail(data_dir, db_url, clock, tls=False, behind_tls_proxy=True) as wm,
        wm.client() as client,
    ):
        page = await client.get("/connexion")
        assert page.headers["strict-transport-security"] == HSTS[1].decode()
        _value, attrs = cookie_attributes(set_cookies(page)["__Host-csrf"])
        assert "secure" in attrs


async def test_login_rotates_the_session(data_dir: Path, db_url: str, clock: FakeClock) -> None:
    """Session fixation: a session planted before login is never the one used after."""
    async with running_webmail(data_dir, db_url, clock) as wm:
        code = await wm.issue_code(demo.CREATED_EMAIL)
        async with wm.client() as attacker:
            # The attacker's own pre-login session (activation step 1 passed)...
            r = await post_form(
                attacker,
                "/activation",
                "/activation",
                {
                    "ins": demo.CREATED_EMAIL,
                    "jour": "17",
                    "mois": "1",
                    "annee": "1979",
                    "code": code,
                },
            )
            assert r.headers["location"] == "/activation/adresse"
            planted = attacker.cookies["__Host-session"]
            assert (await attacker.get("/activation/adresse")).status_code == 200

        # ... planted in the victim's browser, with a made-up one as well.
        for fixed in (planted, secrets.token_urlsafe(32)):
            async with wm.client() as victim:
                victim.cookies.set("__Host-session", fixed, domain="127.0.0.1")
                assert (await victim.get("/connexion")).status_code == 200
                r = await login(victim)
                assert r.status_code == 303 and r.headers["location"] == "/messages"
                new = cookie_attributes(set_cookies(r)["__Host-session"])[0]
                assert new != fixed
                assert (await victim.get("/messages")).status_code == 200
                ids = {row.id for row in await session_rows(wm)}
                assert digest(new) in ids and digest(fixed) not in ids
            async with wm.client() as replay:
                replay.cookies.set("__Host-session", fixed, domain="127.0.0.1")
                r = await replay.get("/messages")
                assert r.status_code == 303 and r.headers["location"] == "/connexion"
                r = await replay.get("/activation/adresse")
                assert r.status_code == 303 and r.headers["location"] == "/activation"

        # Logging in again in a logged-in browser rotates too (the login page
        # redirects a logged-in browser: the form is posted with the session's token).
        async with logged_in(wm) as browser:
            before = browser.cookies["__Host-session"]
            form = {"identifiant": demo.ACTIVATED, "mot_de_passe": demo.PASSWORD}
            assert (await browser.get("/connexion")).headers["location"] == "/messages"
            r = await post_form(browser, "/messages", "/connexion", form)
            assert r.status_code == 303
            after = browser.cookies["__Host-session"]
            assert after != before
            assert digest(before) not in {row.id for row in await session_rows(wm)}


async def test_logout_ends_the_session_on_the_server(
    data_dir: Path, db_url: str, clock: FakeClock
) -> None:
    async with running_webmail(data_dir, db_url, clock) as wm:
        async with logged_in(wm) as browser:
            token = browser.cookies["__Host-session"]
            r = await post_form(browser, "/messages", "/deconnexion", {})
            assert r.status_code == 303 and r.headers["location"] == "/connexion?info=logout"
            # The browser is told to drop the cookie...
            _value, attrs = cookie_attributes(set_cookies(r)["__Host-session"])
            assert attrs.get("max-age") == "0" or "expires" in attrs
        assert await session_rows(wm) == []
        # ... and a copy of it opens nothing.
        async with wm.client() as replay:
            replay.cookies.set("__Host-session", token, domain="127.0.0.1")
            for url in ("/messages", "/historique", "/compte"):
                r = await replay.get(url)
                assert r.status_code == 303 and r.headers["location"] == "/connexion", url


async def test_idle_timeout(data_dir: Path, db_url: str, clock: FakeClock) -> None:
    async with running_webmail(data_dir, db_url, clock, idle_timeout=600) as wm:
        async with logged_in(wm) as browser:
            for _ in range(3):  # in use: each request keeps it alive
                clock.advance(seconds=590)
                assert (await browser.get("/messages")).status_code == 200
            clock.advance(seconds=600)
            r = await browser.get("/messages")
            assert r.status_code == 303 and r.headers["location"] == "/connexion"
        assert await session_rows(wm) == []


async def test_absolute_timeout(data_dir: Path, db_url: str, clock: FakeClock) -> None:
    async with running_webmail(
        data_dir, db_url, clock, idle_timeout=600, absolute_timeout=1800
    ) as wm:
        async with logged_in(wm) as browser:
            for _ in range(5):
                clock.advance(seconds=300)
                assert (await browser.get("/messages")).status_code == 200
            clock.advance(seconds=299)  # 1799 s after login
            assert (await browser.get("/messages")).status_code == 200
            clock.advance(seconds=1)  # 1800 s: over, however active
            r = await browser.get("/messages")
            assert r.status_code == 303 and r.headers["location"] == "/connexion"
        assert await session_rows(wm) == []


# --- headers ---------------------------------------------------------------------------


def csp_directives(response: httpx.Response) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for part in response.headers["content-security-policy"].split(";"):
        name, *values = part.split()
        out[name.lower()] = values
    return out


def assert_page_headers(response: httpx.Response, *, hsts: bool = True) -> None:
    csp = csp_directives(response)
    # No script runs: script-src 'none' and nothing that could loosen it.
    assert csp["script-src"] == ["'none'"]
    assert csp["default-src"] == ["'none'"]
    assert "script-src-elem" not in csp and "script-src-attr" not in csp
    policy = response.headers["content-security-policy"]
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy and "*" not in policy
    assert csp["frame-ancestors"] == ["'none'"]
    assert csp["object-src"] == ["'none'"] and csp["base-uri"] == ["'none'"]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "same-origin"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["cache-control"] == "no-store"
    if hsts:
        value = response.headers["strict-transport-security"]
        assert int(re.search(r"max-age=(\d+)", value).group(1)) >= 31_536_000  # type: ignore[union-attr]


async def test_security_headers_on_pages(data_dir: Path, db_url: str, clock: FakeClock) -> None:
    async with running_webmail(data_dir, db_url, clock) as wm:
        await deliver(wm, demo.ACTIVATED)
        [conv] = await wm.conversations(demo.ACTIVATED)
        async with wm.client() as anonymous:
            for url in ("/connexion", "/activation", "/messages", "/nowhere"):
                assert_page_headers(await anonymous.get(url))
            assert_page_headers(await anonymous.post("/connexion", data={}))  # 403
        async with logged_in(wm) as browser:
            for url in ("/messages", f"/conversations/{conv}", "/historique", "/compte"):
                r = await browser.get(url)
                assert r.status_code == 200, url
                assert_page_headers(r)
            assert_page_headers(await browser.get(f"/conversations/{NOWHERE}"))
            # The style sheet carries no personal data: it may be cached.
            css = await browser.get("/static/style.css")
            assert css.status_code == 200 and "no-store" not in css.headers.get("cache-control", "")
            assert css.headers["x-content-type-options"] == "nosniff"


async def test_attachment_downloads(data_dir: Path, db_url: str, clock: FakeClock) -> None:
    """DOMAIN.md 4: downloads only, in the declared type when it is an allowed one."""
    page_html = b"<html><body><script>alert(document.cookie)</script></body></html>"
    svg = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
    async with running_webmail(data_dir, db_url, clock) as wm:
        await deliver(
            wm,
            demo.ACTIVATED,
            attachments=[
                (PDF, "application", "pdf", "compte-rendu.pdf"),
                (page_html, "text", "html", "resultats.html"),
                (svg, "image", "svg+xml", "schema.svg"),
            ],
        )
        [d] = await deliveries(wm, demo.ACTIVATED)
        async with logged_in(wm) as browser:
            pdf = await browser.get(f"/messages/{d.id}/pieces-jointes/1")
            assert pdf.status_code == 200 and pdf.content == PDF
            assert pdf.headers["content-type"] == "application/pdf"
            assert pdf.headers["content-disposition"].startswith("attachment;")
            assert 'filename="compte-rendu.pdf"' in pdf.headers["content-disposition"]
            downloads = [pdf]
            for n, data in ((2, page_html), (3, svg)):
                r = await browser.get(f"/messages/{d.id}/pieces-jointes/{n}")
                assert r.status_code == 200 and r.content == data
                # Never rendered by the browser: an opaque download.
                assert r.headers["content-type"] == "application/octet-stream"
                assert r.headers["content-disposition"].startswith("attachment;")
                downloads.append(r)
            for r in downloads:
                assert r.headers["x-content-type-options"] == "nosniff"
                assert r.headers["cache-control"] == "no-store"
                assert "sandbox" in r.headers["content-security-policy"]
                assert "strict-transport-security" in r.headers
            for n in (0, 4, "x"):
                r = await browser.get(f"/messages/{d.id}/pieces-jointes/{n}")
                assert r.status_code == 404


# --- lockout ---------------------------------------------------------------------------


async def failed_login(client: httpx.AsyncClient, identifier: str, password: str) -> str:
    r = await login(client, identifier, password)
    assert r.status_code == 400, (identifier, r.status_code)
    assert "__Host-session" not in set_cookies(r)
    # The identifier is echoed in the form: take it out to compare the rest.
    return r.text.replace(identifier, "IDENTIFIANT")


async def test_failed_logins_say_the_same_whoever_it_is(
    data_dir: Path, db_url: str, clock: FakeClock
) -> None:
    """Issue 8.9: the login form tells nothing about who has an account."""
    async with running_webmail(data_dir, db_url, clock) as wm, wm.client() as client:
        bodies = {
            who: await failed_login(client, who, "pas-le-bon-mot-de-passe")
            for who in (
                demo.ACTIVATED,  # exists, wrong password
                UNKNOWN_INS,  # well-formed, nobody
                demo.CREATED_EMAIL,  # exists, not activated
                demo.CLOSED,  # exists, closed
                CAMILLE_EMAIL,  # an e-mail that exists
                "personne@example.org",  # one that does not
                "nimporte quoi",  # neither an INS nor an address
            )
        }
        first = bodies[demo.ACTIVATED]
        assert shown(first).count(LOGIN_FAILED) == 1
        for who, body in bodies.items():
            assert body == first, who
        # The right password for a profile that is not activated opens nothing either.
        assert await failed_login(client, demo.CREATED_EMAIL, demo.PASSWORD) == first


async def test_lockout(data_dir: Path, db_url: str, clock: FakeClock) -> None:
    """web.login_failures failures lock the identifier, known or not, for lockout_seconds."""
    async with (
        running_webmail(data_dir, db_url, clock, login_failures=3, lockout_seconds=600) as wm,
        wm.client() as client,
    ):
        locked: dict[str, str] = {}
        for who in (demo.ACTIVATED, UNKNOWN_INS, CAMILLE_EMAIL):
            for _ in range(3):
                body = await failed_login(client, who, "pas-le-bon-mot-de-passe")
                assert LOGIN_FAILED in shown(body)
            # Locked: even the right password is refused, with the lockout text.
            locked[who] = await failed_login(client, who, demo.PASSWORD)
        text = LOCKED.format(until="23 novembre 2026 à 10 h 10")  # 9:00 UTC + 600 s, Paris
        assert text in shown(locked[demo.ACTIVATED])
        assert locked[demo.ACTIVATED] == locked[UNKNOWN_INS] == locked[CAMILLE_EMAIL]
        assert await session_rows(wm) == []
        # Another identifier is not locked by these.
        async with wm.client() as other:
            assert (await login(other, demo.CORSICAN)).status_code == 303

        clock.advance(seconds=599)
        assert await failed_login(client, demo.ACTIVATED, demo.PASSWORD) == locked[demo.ACTIVATED]
        clock.advance(seconds=1)
        r = await login(client, demo.ACTIVATED, demo.PASSWORD)
        assert r.status_code == 303 and r.headers["location"] == "/messages"
        async with wm.client() as other:
            assert (await login(other, CAMILLE_EMAIL, demo.PASSWORD)).status_code == 303


async def activation_form(
    client: httpx.AsyncClient, ins: str, code: str, born: date = date(1979, 1, 17)
) -> httpx.Response:
    return await post_form(
        client,
        "/activation",
        "/activation",
        {
            "ins": ins,
            "jour": str(born.day),
            "mois": str(born.month),
            "annee": str(born.year),
            "code": code,
        },
    )


async def test_activation_form_is_throttled(data_dir: Path, db_url: str, clock: FakeClock) -> None:
    async with (
        running_webmail(data_dir, db_url, clock, login_failures=3, lockout_seconds=600) as wm,
        wm.client() as client,
    ):
        code = await wm.issue_code(demo.CREATED_EMAIL)
        for _ in range(3):
            r = await activation_form(client, demo.CREATED_EMAIL, "AAAA-BBBB-CCCC")
            assert r.status_code == 400 and ACTIVATION_FAILED in shown(r.text)
        r = await activation_form(client, demo.CREATED_EMAIL, code)
        assert r.status_code == 400
        assert "Trop de tentatives" in shown(r.text) and ACTIVATION_FAILED not in shown(r.text)
        assert await session_rows(wm) == []
        # An INS that belongs to nobody locks the same way.
        for _ in range(3):
            await activation_form(client, UNKNOWN_INS, "AAAA-BBBB-CCCC")
        other = await activation_form(client, UNKNOWN_INS, code)
        assert other.text.replace(UNKNOWN_INS, "I") == r.text.replace(demo.CREATED_EMAIL, "I")

        clock.advance(seconds=600)
        r = await activation_form(client, demo.CREATED_EMAIL, code)
        assert r.status_code == 303 and r.headers["location"] == "/activation/adresse"


async def test_email_code_errors_end_the_activation_step(
    data_dir: Path, db_url: str, clock: FakeClock
) -> None:
    async with running_webmail(data_dir, db_url, clock) as wm, wm.client() as client:
        code = await wm.issue_code(demo.CREATED_EMAIL)
        assert (await activation_form(client, demo.CREATED_EMAIL, code)).status_code == 303
        address = "jean.perso@example.org"
        r = await post_form(
            client, "/activation/adresse", "/activation/adresse", {"email": address}
        )
        assert r.headers["location"] == "/activation/confirmation"
        good = wm.last_code(address)
        wrong = f"{(int(good) + 1) % 1_000_000:06d}"
        form = {"mot_de_passe": NEW_PASSWORD, "confirmation": NEW_PASSWORD}
        page = "/activation/confirmation"
        for _ in range(5):
            r = await post_form(client, page, page, {"code": wrong, **form})
            assert r.status_code == 400 and "Code incorrect" in shown(r.text)
        # Five wrong codes: the right one no longer works.
        r = await post_form(client, page, page, {"code": good, **form})
        assert r.status_code == 400 and "Ce code a expiré" in shown(r.text)
        assert (await wm.patient(demo.CREATED_EMAIL)).status is ProfileStatus.CREATED
        assert await outbound_count(wm) == 0
        # A new code, sent again, is the way on; three codes per activation at most.
        await post_form(client, "/activation/adresse", "/activation/adresse", {"email": address})
        third = await post_form(
            client, "/activation/adresse", "/activation/adresse", {"email": address}
        )
        assert third.headers["location"] == "/activation/confirmation"
        sent = len(wm.mails())
        r = await post_form(
            client, "/activation/adresse", "/activation/adresse", {"email": address}
        )
        assert r.status_code == 400 and "Trop de codes envoyés" in shown(r.text)
        assert len(wm.mails()) == sent
        r = await post_form(client, page, page, {"code": wm.last_code(address), **form})
        assert r.status_code == 303 and r.headers["location"] == "/messages?info=activated"
        assert (await wm.patient(demo.CREATED_EMAIL)).status is ProfileStatus.ACTIVATED


# --- sizes -----------------------------------------------------------------------------


async def test_body_over_max_upload_is_refused(
    data_dir: Path, db_url: str, clock: FakeClock
) -> None:
    async with running_webmail(data_dir, db_url, clock, max_upload=20_000) as wm:
        await deliver(wm, demo.ACTIVATED)
        [conv] = await wm.conversations(demo.ACTIVATED)
        async with logged_in(wm) as browser:
            action = f"/conversations/{conv}/repondre"
            token = csrf_of((await browser.get(f"/conversations/{conv}")).text)
            before = await snapshot(wm)
            big = b"%PDF-1.4\n" + bytes(30_000)
            r = await browser.post(
                action,
                data={"csrf": token, "message": "Voici"},
                files={"pieces_jointes": ("scan.pdf", big, "application/pdf")},
            )
            assert r.status_code == 413

            # Without Content-Length (chunked): counted as it arrives.
            async def chunks() -> Any:
                yield b"csrf=" + token.encode() + b"&message="
                for _ in range(30):
                    yield b"x" * 1000

            r = await browser.post(
                action,
                content=chunks(),
                headers={"content-type": "application/x-www-form-urlencoded"},
            )
            assert r.status_code == 413
            assert await snapshot(wm) == before
            # Under the limit, the same form goes through.
            small = b"%PDF-1.4\n" + bytes(3_000)
            r = await browser.post(
                action,
                data={"csrf": token, "message": "Voici"},
                files={"pieces_jointes": ("scan.pdf", small, "application/pdf")},
            )
            assert r.status_code == 303
            assert await outbound_count(wm) == 1


async def test_too_many_files_are_refused_cleanly(
    data_dir: Path, db_url: str, clock: FakeClock
) -> None:
    async with running_webmail(data_dir, db_url, clock) as wm:
        await deliver(wm, demo.ACTIVATED)
        [conv] = await wm.conversations(demo.ACTIVATED)
        limit = wm.gateway.store.settings.replies.max_attachments
        async with logged_in(wm) as browser:
            token = csrf_of((await browser.get(f"/conversations/{conv}")).text)
            before = await snapshot(wm)
            for count in (limit + 1, limit + 2, 200):
                files = [
                    ("pieces_jointes", (f"note{i}.txt", b"texte", "text/plain"))
                    for i in range(count)
                ]
                r = await browser.post(
                    f"/conversations/{conv}/repondre",
                    data={"csrf": token, "message": "Voici"},
                    files=files,
                )
                assert r.status_code == 400, (count, r.status_code)
                assert "<h1>" in r.text and "Traceback" not in r.text
                assert await snapshot(wm) == before
            r = await browser.post(
                f"/conversations/{conv}/repondre",
                data={"csrf": token, "message": "Voici"},
                files=[
                    ("pieces_jointes", (f"note{i}.txt", b"texte", "text/plain"))
                    for i in range(limit + 1)
                ],
            )
            assert f"au plus {limit} pièces jointes" in shown(r.text)


async def test_uploaded_files_are_closed(data_dir: Path, db_url: str, clock: FakeClock) -> None:
    """Regression: the reply and new-message forms never closed their uploads
    (Starlette leaves that to the caller), so each file's spooled temporary
    file stayed open until garbage collection (ResourceWarning, an error
    under pytest's filterwarnings)."""
    async with running_webmail(data_dir, db_url, clock) as wm:
        await deliver(wm, demo.ACTIVATED)
        [conv] = await wm.conversations(demo.ACTIVATED)
        page = f"/conversations/{conv}"
        big = b"%PDF-1.4\n" + bytes(1_200_000)  # over Starlette's 1 MB: a real temporary file
        async with logged_in(wm) as browser:
            token = csrf_of((await browser.get(page)).text)
            posts = [
                (f"{page}/repondre", {"message": "Voici"}, ("cr.pdf", big)),  # sent
                (f"{page}/repondre", {"message": "Voici"}, ("x.exe", b"MZ" + bytes(99))),  # refused
                (
                    "/nouveau",
                    {"conversation": str(conv), "subject": "", "message": "M"},
                    ("a.pdf", PDF),
                ),
                (
                    "/nouveau",
                    {"conversation": str(conv), "subject": "S", "message": "M"},
                    ("b.pdf", PDF),
                ),
            ]
            statuses = []
            for action, form, (name, data) in posts:
                r = await browser.post(
                    action,
                    data={"csrf": token, **form},
                    files={"pieces_jointes": (name, data, "application/pdf")},
                )
                statuses.append(r.status_code)
            assert statuses == [303, 400, 400, 303]
            gc.collect()  # an unclosed file would warn now, inside the test
        assert await outbound_count(wm) == 2


# --- internal errors -------------------------------------------------------------------


async def test_internal_error_page_shows_a_reference_only(
    data_dir: Path,
    db_url: str,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "dossier-42 of patient 2840575123901"

    async def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError(secret)

    async with running_webmail(data_dir, db_url, clock) as wm:
        await deliver(wm, demo.ACTIVATED)
        [conv] = await wm.conversations(demo.ACTIVATED)
        async with logged_in(wm) as browser:
            token = csrf_of((await browser.get("/messages")).text)
            monkeypatch.setattr(mailbox_store, "list_conversations", broken)
            monkeypatch.setattr(mailbox_store, "trash", broken)
            # One connection for both: the error page does not cost the connection
            # (the exception is answered inside Starlette's ServerErrorMiddleware).
            pages = []
            with caplog.at_level(logging.ERROR, logger="mssante.web"):
                async with wm.client(cookies=browser.cookies) as tab:
                    pages.append(await tab.get("/messages"))
                    action = f"/conversations/{conv}/corbeille"
                    pages.append(await tab.post(action, data={"csrf": token}))
                    # Logged once: no second trace from the server.
                    traces = [r for r in caplog.records if r.exc_info]
                    assert len(traces) == 2
            for r in pages:
                assert r.status_code == 500
                body = shown(r.text)
                ref = re.search(r"référence ([0-9a-f]{12})", body)
                assert ref, body
                for leak in (secret, "RuntimeError", "Traceback", 'File "', "mssante/"):
                    assert leak not in body
                assert_page_headers(r)
                # The reference finds the trace in the log.
                assert any(
                    ref.group(1) in rec.getMessage() and rec.exc_info for rec in caplog.records
                )
            monkeypatch.undo()
            assert (await browser.get("/messages")).status_code == 200
        # Nothing was trashed.
        [d] = await deliveries(wm, demo.ACTIVATED)
        assert d.trashed_at is None
