"""A running gateway with its webmail, for the webmail tests (HTTP and browser).

``running_webmail`` starts the real Gateway (SMTP on port 0, the webmail on
port 0, HTTPS with a certificate from tests/pki.py unless ``tls=False``) on
the test's database, seeds the demo patients with the webmail password
``demo.PASSWORD`` and yields a :class:`Webmail`.  Professional mail
arrives over real SMTP (:meth:`Webmail.deliver`).  Activation codes and
e-mail confirmation codes are read from the notification outbox (the file
transport), like a patient reading their e-mail.
"""

from __future__ import annotations

import contextlib
import email
import re
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import httpx
from argon2 import PasswordHasher
from sqlalchemy import select

from mssante import demo
from mssante.app import Gateway
from mssante.cli import seed_demo
from mssante.store import credentials
from mssante.store.models import Conversation, Patient
from mssante.web.activation import send_activation_code
from mssante.web.server import WebServer
from tests.conftest import FakeClock, make_settings
from tests.pki import Pki
from tests.test_gateway import DOCTOR, addr, professional_message, send

# argon2id with small parameters: the same code paths, a fraction of the time.
credentials.HASHER = credentials.SecretHasher(
    PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
)


@dataclass
class Webmail:
    gateway: Gateway
    url: str  # https://127.0.0.1:<port>
    ca: Path | None  # the anchors that verify the webmail's certificate
    clock: FakeClock
    outbox: Path

    @property
    def server(self) -> WebServer:
        assert self.gateway.web is not None
        return self.gateway.web

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An HTTP client with its own cookie jar (one browser)."""
        verify: ssl.SSLContext | bool = False
        if self.ca is not None:
            verify = ssl.create_default_context(cafile=str(self.ca))
        return httpx.AsyncClient(base_url=self.url, verify=verify, timeout=30, **kwargs)

    async def deliver(
        self,
        ins: str = demo.ACTIVATED,
        *,
        sender: str = DOCTOR,
        **kwargs: Any,
    ) -> EmailMessage:
        """A professional's message, over SMTP (kwargs: tests.test_gateway.professional_message)."""
        msg = professional_message([addr(ins)], sender=sender, **kwargs)
        errors, _ = await send(self.gateway, msg, sender=sender)
        assert not errors
        return msg

    async def deliver_message(self, msg: EmailMessage, *, sender: str = DOCTOR) -> None:
        errors, _ = await send(self.gateway, msg, sender=sender)
        assert not errors

    async def patient(self, ins: str) -> Patient:
        async with self.gateway.store.reads() as s:
            patient = await s.scalar(select(Patient).where(Patient.ins == ins))
        assert patient is not None
        return patient

    async def conversations(self, ins: str) -> list[int]:
        pid = (await self.patient(ins)).id
        async with self.gateway.store.reads() as s:
            rows = await s.scalars(
                select(Conversation.id)
                .where(Conversation.patient_id == pid)
                .order_by(Conversation.id)
            )
        return list(rows)

    async def issue_code(self, ins: str) -> str:
        """A provisional code for ``ins``, sent by e-mail, read back from the outbox."""
        patient = await self.patient(ins)
        store = self.gateway.store
        issued = await credentials.issue_activation_code(
            store, patient.id, at=self.clock.now(), channel=credentials.Channel.EMAIL
        )
        await send_activation_code(
            store, store.settings, self.clock, patient, issued, transport=None
        )
        return issued.code

    def mails(self) -> list[EmailMessage]:
        out = []
        for path in sorted(self.outbox.glob("*.eml"), key=lambda p: p.stat().st_mtime_ns):
            out.append(email.message_from_bytes(path.read_bytes(), policy=default_policy))
        return out  # type: ignore[return-value]

    def last_code(self, to: str, pattern: str = r"\b(\d{6})\b") -> str:
        """The last code e-mailed to ``to`` (the e-mail confirmation, by default)."""
        for msg in reversed(self.mails()):
            if to.lower() in str(msg["To"]).lower():
                body = msg.get_body(preferencelist=("plain",))
                assert body is not None
                found = re.search(pattern, body.get_content())
                if found:
                    return found.group(1)
        raise AssertionError(f"no code e-mailed to {to}")


@contextlib.asynccontextmanager
async def running_webmail(
    data_dir: Path, db_url: str, clock: FakeClock, *, tls: bool = True, **web: Any
) -> AsyncIterator[Webmail]:
    settings = make_settings(data_dir, database_url=db_url, max_message_size=2_000_000)
    ca: Path | None = None
    web_settings: dict[str, Any] = {"enabled": True, "port": 0, **web}
    if tls:
        pki = Pki(data_dir.parent / "web-pki")
        cert = pki.issue("webmail", "CN=127.0.0.1,O=Webmail TEST,C=FR", server=True)
        ca = pki.anchors()
        web_settings.update(tls_cert=cert.cert_path, tls_key=cert.key_path)
    settings = settings.model_copy(update={"web": settings.web.model_copy(update=web_settings)})
    gw = Gateway(settings, clock=clock)
    await gw.start()
    try:
        await seed_demo(gw.store, passwords=True)
        assert gw.web is not None
        outbox = settings.notify.outbox_path(settings.store.data_dir)
        yield Webmail(gw, gw.web.url, ca, clock, outbox)
    finally:
        await gw.stop()


CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(html: str) -> str:
    found = CSRF.search(html)
    assert found, "no CSRF token in the page"
    return found.group(1)


async def login(
    client: httpx.AsyncClient, identifier: str = demo.ACTIVATED, password: str = demo.PASSWORD
) -> httpx.Response:
    page = await client.get("/connexion")
    response = await client.post(
        "/connexion",
        data={"csrf": csrf_of(page.text), "identifiant": identifier, "mot_de_passe": password},
    )
    return response


async def post_form(
    client: httpx.AsyncClient, page_url: str, action: str, data: dict[str, str], **kwargs: Any
) -> httpx.Response:
    """GET ``page_url`` for its CSRF token, then POST ``data`` to ``action``."""
    page = await client.get(page_url)
    return await client.post(action, data={"csrf": csrf_of(page.text), **data}, **kwargs)
