"""The webmail's pages over HTTP (issue 8): what they list, in which order, and what they do.

The browser tests (tests/browser/) look at the pages in Chromium; these
check behaviour through a plain HTTP client on both databases: paging and
order of the conversation list, trash and restore, the activity history,
the new-message page and what it queues, the second factor, and the
reply form's refusals.
"""

from __future__ import annotations

import email
import re
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path

import httpx
from sqlalchemy import select

from mssante import demo
from mssante.store.models import Delivery, OutboundMessage, ProfileStatus
from tests.conftest import FakeClock
from tests.test_gateway import DOCTOR
from tests.test_web_security import (
    CARDIO,
    deliver,
    deliveries,
    logged_in,
    patient_id,
    pro_message,
    set_cookies,
    shown,
    shown_secret,
    totp_now,
)
from tests.webmail import Webmail, csrf_of, login, post_form, running_webmail

CONVERSATION_LINK = re.compile(r'href="/conversations/(\d+)(?:\?corbeille=1)?"')


def listed(page: str) -> list[int]:
    """The conversation ids of a list page, in the order shown."""
    return [int(n) for n in CONVERSATION_LINK.findall(page)]


def articles(page: str) -> list[int]:
    """The delivery ids of the messages a conversation page shows."""
    return [int(n) for n in re.findall(r'<article [^>]*aria-labelledby="m(\d+)"', page)]


async def queued(wm: Webmail) -> list[EmailMessage]:
    """The outbound queue's messages, as they will go on the wire."""
    store = wm.gateway.store
    out = []
    async with store.reads() as s:
        rows = list(await s.scalars(select(OutboundMessage).order_by(OutboundMessage.id)))
        for row in rows:
            parsed = email.message_from_bytes(await store.outbound.read(row), policy=default_policy)
            assert isinstance(parsed, EmailMessage)
            out.append(parsed)
    return out


def body_of(msg: EmailMessage) -> str:
    part = msg.get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content())


# --- the conversation list -------------------------------------------------------------


async def test_conversation_list_pages_unread_first(
    data_dir: Path, db_url: str, clock: FakeClock
) -> None:
    async with running_webmail(data_dir, db_url, clock, page_size=5) as wm:
        senders = [f"dr.p{i}@chu-exemple.mssante.fr" for i in range(7)]
        for i, sender in enumerate(senders):
            await deliver(wm, demo.ACTIVATED, sender=sender, name=f"Dr P{i}", subject=f"Sujet {i}")
            clock.advance(seconds=60)
        convs = await wm.conversations(demo.ACTIVATED)  # by id: oldest first
        assert len(convs) == 7
        async with logged_in(wm) as browser:
            first = await browser.get("/messages")
            assert "7 conversations, page 1 sur 2." in shown(first.text)
            # All unread: the latest first, five to a page.
            assert listed(first.text) == convs[::-1][:5]
            assert 'href="?page=2" rel="next"' in first.text
            assert 'rel="prev"' not in first.text
            second = await browser.get("/messages?page=2")
            assert listed(second.text) == convs[::-1][5:]
            assert 'href="?page=1" rel="prev"' in second.text and 'rel="next"' not in second.text
            assert listed((await browser.get("/messages?page=abc")).text) == listed(first.text)
            assert listed((await browser.get("/messages?page=9")).text) == []

            # Reading two of them sends them after every unread one.
            for conv in (convs[6], convs[2]):
                assert (await browser.get(f"/conversations/{conv}")).status_code == 200
            order = [convs[i] for i in (5, 4, 3, 1, 0, 6, 2)]
            page1 = (await browser.get("/messages")).text
            assert listed(page1) == order[:5]
            assert listed((await browser.get("/messages?page=2")).text) == order[5:]
            assert page1.count('class="unread"') == 5

            # A new message in a read conversation: unread again, and the latest.
            await deliver(wm, demo.ACTIVATED, sender=senders[2], name="Dr P2", subject="Suite")
            page1 = (await browser.get("/messages")).text
            assert listed(page1) == [convs[2], *order[:4]]
            assert "7 conversations" in shown(page1)


# --- trash -----------------------------------------------------------------------------


async def test_trash_and_restore(data_dir: Path, db_url: str, clock: FakeClock) -> None:
    async with running_webmail(data_dir, db_url, clock) as wm:
        await deliver(wm, demo.ACTIVATED, subject="Compte rendu", body="premier")
        clock.advance(seconds=60)
        await deliver(wm, demo.ACTIVATED, subject="Compte rendu", body="second")
        clock.advance(seconds=60)
        await deliver(wm, demo.ACTIVATED, sender=CARDIO, name="Dr Bernard", subject="Holter")
        conv, holter = await wm.conversations(demo.ACTIVATED)
        first, second, _ = [d.id for d in await deliveries(wm, demo.ACTIVATED)]
        page = f"/conversations/{conv}"
        async with logged_in(wm) as browser:
            assert articles((await browser.get(page)).text) == [first, second]
            assert "La corbeille est vide." in shown((await browser.get("/corbeille")).text)

            # One message to the trash.
            r = await post_form(browser, page, f"/messages/{first}/corbeille", {})
            assert (
                r.status_code == 303 and r.headers["location"] == "/messages?info=message_trashed"
            )
            listing = await browser.get(r.headers["location"])
            assert "Le message a été placé dans la corbeille." in shown(listing.text)
            assert listed(listing.text) == [holter, conv]
            assert articles((await browser.get(page)).text) == [second]
            trash = (await browser.get("/corbeille")).text
            assert listed(trash) == [conv] and "1 message" in shown(trash)
            assert f'href="/conversations/{conv}?corbeille=1"' in trash
            in_trash = (await browser.get(f"{page}?corbeille=1")).text
            assert articles(in_trash) == [first]
            assert f'action="{page}/restaurer"' in in_trash and "/repondre" not in in_trash
            # Already in the trash: nothing to move.
            assert (
                await post_form(browser, page, f"/messages/{first}/corbeille", {})
            ).status_code == 404

            # Restored from the trash page.
            r = await post_form(browser, f"{page}?corbeille=1", f"{page}/restaurer", {})
            assert r.status_code == 303 and r.headers["location"] == f"{page}?info=restored"
            restored = (await browser.get(r.headers["location"])).text
            assert "Le message a été restauré." in shown(restored)
            assert articles(restored) == [first, second]
            assert "La corbeille est vide." in shown((await browser.get("/corbeille")).text)
            assert (await post_form(browser, page, f"{page}/restaurer", {})).status_code == 404

            # The whole conversation to the trash.
            r = await post_form(browser, page, f"{page}/corbeille", {})
            assert r.status_code == 303 and r.headers["location"] == "/messages?info=trashed"
            listing = await browser.get(r.headers["location"])
            assert "La conversation a été placée dans la corbeille." in shown(listing.text)
            assert listed(listing.text) == [holter]
            assert (await browser.get(page)).status_code == 200
            assert articles((await browser.get(page)).text) == []
            trash = (await browser.get("/corbeille")).text
            assert listed(trash) == [conv] and "2 messages" in shown(trash)
            assert articles((await browser.get(f"{page}?corbeille=1")).text) == [first, second]
        rows = {d.id: d for d in await deliveries(wm, demo.ACTIVATED)}
        assert rows[first].trashed_at == rows[second].trashed_at == clock.now()
        assert all(d.trashed_at is None for d in rows.values() if d.conversation_id == holter)


# --- history ---------------------------------------------------------------------------


async def test_history_in_french_without_content(
    data_dir: Path, db_url: str, clock: FakeClock
) -> None:
    """DOMAIN.md 3: everything done is visible to the patient, in words, never the content."""
    subject, body = "Biopsie hépatique XK-204", "Lésion de 12 mm QWERTZ"
    # The demo patients are made on the real clock: this test's events happen
    # on a day of their own, to be told apart.
    clock.advance(days=400)  # 28 December 2027, 9:00 UTC
    async with running_webmail(data_dir, db_url, clock) as wm:
        await deliver(wm, demo.ACTIVATED, subject=subject, body=body)
        [conv] = await wm.conversations(demo.ACTIVATED)
        [d] = await deliveries(wm, demo.ACTIVATED)
        page = f"/conversations/{conv}"
        async with logged_in(wm) as browser:
            clock.advance(seconds=60)
            assert subject in (await browser.get(page)).text  # read: a history line
            clock.advance(seconds=60)
            reply = "Merci, je prends rendez-vous ZORGLUB"
            r = await post_form(browser, page, f"{page}/repondre", {"message": reply})
            assert r.status_code == 303
            clock.advance(seconds=60)
            await post_form(browser, page, f"/messages/{d.id}/corbeille", {})
            clock.advance(seconds=60)
            await post_form(browser, "/corbeille", f"{page}/restaurer", {})
            history = await browser.get("/historique")
            assert history.status_code == 200
        text = shown(history.text)
        rows = re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td></tr>", history.text)
        ours = [(shown(at), shown(s)) for at, s in rows if at.startswith("28 décembre 2027")]
        sentences = [s for _, s in ours]
        assert sentences == [
            "1 message restauré depuis la corbeille",
            "1 message mis à la corbeille",
            "Réponse envoyée à Dr Alice Durand",
            "Lecture d'un message de Dr Alice Durand",
            "Connexion",
            "Message reçu de Dr Alice Durand",
        ]
        assert ours[0][0] == "28 décembre 2027 à 10 h 04"  # 9:04 UTC, Paris time
        for secret in (subject, "XK-204", "Biopsie", "QWERTZ", "ZORGLUB", DOCTOR, demo.ACTIVATED):
            assert secret not in text, secret


# --- new message -----------------------------------------------------------------------


async def test_new_message_to_a_professional_who_wrote(
    data_dir: Path, db_url: str, clock: FakeClock
) -> None:
    """DOMAIN.md 4: only to professionals who wrote and did not end the exchange."""
    async with running_webmail(data_dir, db_url, clock) as wm:
        await deliver(wm, demo.ACTIVATED, subject="Compte rendu")
        await deliver(wm, demo.ACTIVATED, sender=CARDIO, name="Dr Bernard", subject="Holter")
        await deliver(wm, demo.ACTIVATED, sender=CARDIO, name="Dr Bernard", subject="[FIN]")
        await deliver(wm, demo.CORSICAN, subject="Pour B")
        open_conv, ended = await wm.conversations(demo.ACTIVATED)
        [others] = await wm.conversations(demo.CORSICAN)
        async with logged_in(wm) as browser:
            page = (await browser.get("/nouveau")).text
            select = page[page.index('<select id="conversation"') :]
            select = select[: select.index("</select>")]
            offered = [int(v) for v in re.findall(r'<option value="(\d+)"', select)]
            assert offered == [open_conv]
            assert "Dr Alice Durand – Compte rendu" in shown(page)

            refusals = [
                (
                    {"conversation": str(ended), "subject": "Q", "message": "M"},
                    "Dr Bernard a mis fin à vos échanges.",
                ),
                (
                    {"conversation": str(others), "subject": "Q", "message": "M"},
                    "Cette conversation est introuvable.",
                ),
                (
                    {"conversation": "", "subject": "Q", "message": "M"},
                    "Choisissez le professionnel à qui écrire.",
                ),
                (
                    {"conversation": str(open_conv), "subject": "", "message": "M"},
                    "Indiquez l'objet de votre message.",
                ),
                (
                    {"conversation": str(open_conv), "subject": "Q", "message": " "},
                    "Votre message est vide.",
                ),
            ]
            for form, says in refusals:
                r = await post_form(browser, "/nouveau", "/nouveau", form)
                assert r.status_code == 400, form
                assert says in shown(r.text), form
                # What was typed stays in the form.
                assert form["subject"] in r.text
            assert await queued(wm) == []

            r = await post_form(
                browser,
                "/nouveau",
                "/nouveau",
                {
                    "conversation": str(open_conv),
                    "subject": "Question sur mon traitement",
                    "message": "Bonjour docteur, puis-je arrêter le traitement ?",
                },
            )
            assert r.status_code == 303
            assert r.headers["location"] == f"/conversations/{open_conv}?info=sent#fin"
            shown_page = shown((await browser.get(f"/conversations/{open_conv}?info=sent")).text)
            assert "Votre message a été envoyé." in shown_page
        [msg] = await queued(wm)
        assert msg["Subject"] == "Question sur mon traitement"
        assert msg["In-Reply-To"] is None and msg["References"] is None
        assert msg["To"].addresses[0].addr_spec == DOCTOR
        assert "puis-je arrêter le traitement" in body_of(msg)


# --- the second factor -----------------------------------------------------------------


async def code_page(client: httpx.AsyncClient, code: str) -> httpx.Response:
    return await post_form(client, "/connexion/code", "/connexion/code", {"code": code})


async def test_totp_enable_login_replay_disable(
    data_dir: Path, db_url: str, clock: FakeClock
) -> None:
    """RFC 6238: an optional second factor; each code opens one session only."""
    async with running_webmail(data_dir, db_url, clock) as wm:
        setup = "/compte/double-authentification"
        async with logged_in(wm) as browser:
            assert "Double authentification désactivée" in shown(
                (await browser.get("/compte")).text
            )
            secret = shown_secret((await browser.get(setup)).text)
            assert len(secret) == 32
            r = await post_form(browser, setup, setup, {"code": "000000"})
            assert r.status_code == 400 and "Code incorrect" in shown(r.text)
            assert shown_secret(r.text) == secret  # the same key, to try again
            enabling = totp_now(secret, clock)
            r = await post_form(browser, setup, setup, {"code": enabling})
            assert r.status_code == 303 and r.headers["location"] == "/compte?info=totp"
            account = shown((await browser.get(r.headers["location"])).text)
            assert "Double authentification activée" in account
            assert "La double authentification est activée." in account
            await post_form(browser, "/compte", "/deconnexion", {})

        async with wm.client() as browser:
            r = await login(browser)
            assert r.status_code == 303 and r.headers["location"] == "/connexion/code"
            pending = browser.cookies["__Host-session"]
            # Half logged in: no mailbox yet.
            for url in ("/messages", "/compte", "/historique"):
                r = await browser.get(url)
                assert r.status_code == 303 and r.headers["location"] == "/connexion"
            r = await code_page(browser, "123456" if enabling != "123456" else "654321")
            assert r.status_code == 400 and "Code incorrect ou expiré." in shown(r.text)
            # The code that turned the factor on was used once already.
            r = await code_page(browser, enabling)
            assert r.status_code == 400
            clock.advance(seconds=30)
            code = totp_now(secret, clock)
            r = await code_page(browser, code)
            assert r.status_code == 303 and r.headers["location"] == "/messages"
            assert browser.cookies["__Host-session"] != pending  # a new session
            assert (await browser.get("/messages")).status_code == 200

        # The same code again, from another browser: refused (replay).
        async with wm.client() as thief:
            assert (await login(thief)).headers["location"] == "/connexion/code"
            r = await code_page(thief, code)
            assert r.status_code == 400 and "Code incorrect ou expiré." in shown(r.text)
            assert (await thief.get("/messages")).status_code == 303
            clock.advance(seconds=30)
            r = await code_page(thief, totp_now(secret, clock))
            assert r.status_code == 303

            # Turned off: the password is enough again.
            r = await post_form(
                thief, "/compte", "/compte/double-authentification", {"action": "desactiver"}
            )
            assert r.status_code == 303 and r.headers["location"] == "/compte?info=totp_off"
            account = shown((await thief.get(r.headers["location"])).text)
            assert "La double authentification est désactivée." in account
        async with wm.client() as browser:
            r = await login(browser)
            assert r.status_code == 303 and r.headers["location"] == "/messages"
            assert "__Host-session" in set_cookies(r)


# --- the reply form --------------------------------------------------------------------


async def test_reply_form_refusals(data_dir: Path, db_url: str, clock: FakeClock) -> None:
    async with running_webmail(data_dir, db_url, clock) as wm:
        original = pro_message(demo.ACTIVATED, subject="Compte rendu")
        await wm.deliver_message(original)
        await deliver(wm, demo.ACTIVATED, sender=CARDIO, name="Dr Bernard", subject="Holter")
        await deliver(wm, demo.ACTIVATED, sender=CARDIO, name="Dr Bernard", subject="[FIN]")
        conv, ended = await wm.conversations(demo.ACTIVATED)
        async with logged_in(wm) as browser:
            page = f"/conversations/{conv}"
            r = await post_form(browser, page, f"{page}/repondre", {"message": "   "})
            assert r.status_code == 400
            assert "Votre message est vide." in shown(r.text)
            assert 'aria-invalid="true"' in r.text and f'action="{page}/repondre"' in r.text

            # Ended by the professional: the page says so and offers no form...
            ended_page = f"/conversations/{ended}"
            shown_ended = (await browser.get(ended_page)).text
            assert "Dr Bernard a mis fin à vos échanges." in shown(shown_ended)
            assert "/repondre" not in shown_ended
            # ... and a reply posted anyway is refused with the same words.
            r = await post_form(
                browser, ended_page, f"{ended_page}/repondre", {"message": "Bonjour"}
            )
            assert r.status_code == 400
            assert "Dr Bernard a mis fin à vos échanges." in shown(r.text)
            assert await queued(wm) == []

            # What is typed is kept when a file is refused.
            r = await browser.post(
                f"{page}/repondre",
                data={"csrf": csrf_of((await browser.get(page)).text), "message": "Voici"},
                files={
                    "pieces_jointes": ("virus.exe", b"MZ\x90\x00" + bytes(40), "application/pdf")
                },
            )
            assert r.status_code == 400
            assert "La pièce jointe « virus.exe » n'est pas acceptée" in shown(r.text)
            assert ">Voici</textarea>" in r.text
            assert await queued(wm) == []

            r = await post_form(browser, page, f"{page}/repondre", {"message": "Merci docteur."})
            assert r.status_code == 303
        [msg] = await queued(wm)
        assert msg["Subject"] == "Re: Compte rendu"
        assert msg["In-Reply-To"] == original["Message-ID"]
        assert body_of(msg).strip() == "Merci docteur."
        assert (await wm.patient(demo.ACTIVATED)).status is ProfileStatus.ACTIVATED
        pid = await patient_id(wm, demo.ACTIVATED)
        async with wm.gateway.store.reads() as s:
            mine = await s.scalar(
                select(Delivery).where(Delivery.patient_id == pid).order_by(Delivery.id.desc())
            )
        assert mine is not None and mine.conversation_id == conv and mine.read_at is not None
