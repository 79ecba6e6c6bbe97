"""Codes sent to the patient: the provisional activation code and the e-mail confirmation code.

The activation code goes by the notification channels (DOMAIN.md 3): by
e-mail to the address the insurer knows, unless it bounced
(``email_invalid``), else by post.  The e-mail is made like a notification
(notify/compose.py: French text and accessible HTML, Auto-Submitted, VERP
return path, DKIM) through the same injected transport; the letter is a
one-page PDF (the fonts and layout of notify/letter.py) written durably
into ``<data_dir>/postal/activation-<day>/`` with a ``manifest.csv`` in the
columns of the activity statements (notify/postal.py), so the print
provider handles both alike.

Neither says anything about health, nor carries the INS or the birth
date: what is lost with the letter or the mailbox is a code that is
useless without them.
"""

from __future__ import annotations

import asyncio
import csv
import fcntl
import html
import io
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape

from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import BaseDocTemplate, Flowable, Frame, PageTemplate, Paragraph, Spacer

from mssante.clock import Clock
from mssante.durable import write_file
from mssante.french import PARIS, french_date, french_datetime
from mssante.notify.compose import Sender, button, html_page, service_email
from mssante.notify.letter import (
    ADDRESS_LEFT,
    ADDRESS_LINES,
    ADDRESS_TOP,
    FIRST_FOLD,
    FONT,
    FONT_BOLD,
    MARGIN,
    PAGE_HEIGHT,
    PAGE_WIDTH,
    RenderedLetter,
    printable,
)
from mssante.notify.postal import (
    MANIFEST,
    MANIFEST_COLUMNS,
    LetterStyle,
    ManifestRow,
    address_block,
    recipient_name,
)
from mssante.notify.service import load_signer, make_transport, verp_codec
from mssante.notify.transport import Transport
from mssante.settings import Settings
from mssante.store import audit
from mssante.store.credentials import IssuedCode
from mssante.store.models import Channel, Patient

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from mssante.app import Store

# Who letters are from by default, as `mssante notify postal-batch` (notify/postal_cli.py).
SERVICE_NAME = "Mon espace santé"


class NoChannelError(ValueError):
    """Neither a usable e-mail address nor a postal address: the code cannot be sent."""


def activation_email(patient: Patient) -> str | None:
    """Where an activation code may be e-mailed (DOMAIN.md 3: the insurer's address)."""
    if patient.email_invalid:
        return None
    return patient.insurer_email or patient.activation_email


def activation_channel(patient: Patient) -> Channel | None:
    """How this patient's activation code goes: e-mail, else post, else None."""
    if activation_email(patient):
        return Channel.EMAIL
    if address_block(patient.given_name, patient.family_name, patient.postal_address):
        return Channel.POSTAL
    return None


# --- what both messages say ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CodeMessage:
    """A message whose point is one code: sentences before it, after it, a link."""

    subject: str
    before: tuple[str, ...]
    code: str
    after: tuple[str, ...]
    link: tuple[str, str] | None = None  # (link text, URL)


_NEVER_SHARE = (
    "Ne communiquez jamais ce code : personne ne vous le demandera, ni par téléphone"
    " ni par courriel."
)
_NO_HEALTH_DATA = "ce courrier ne contient aucune information médicale."
_FOOTER = (
    "Ce message ne contient aucune information sur votre santé.",
    "Ce courriel est envoyé automatiquement : merci de ne pas y répondre.",
)


def activation_message(code: IssuedCode, activation_url: str) -> CodeMessage:
    return CodeMessage(
        subject="Votre code d'activation de messagerie de santé",
        before=(
            "Un profil de messagerie de santé a été créé pour vous. Des professionnels de"
            " santé peuvent vous y écrire. Pour lire leurs messages, activez votre profil"
            " avec ce code provisoire :",
        ),
        code=code.code,
        after=(
            f"Ce code est valable jusqu'au {french_datetime(code.expires_at)} (heure de Paris).",
            f"Pour activer votre profil, rendez-vous sur {activation_url}, choisissez"
            " « Activer mon profil » et laissez-vous guider. Vous aurez besoin de votre"
            " numéro de sécurité sociale (carte Vitale) et de votre date de naissance.",
            _NEVER_SHARE,
            "Si vous recevez plusieurs codes, seul le plus récent est valable.",
        ),
        link=("Activer mon profil", activation_url),
    )


def confirmation_message(code: str, minutes: int) -> CodeMessage:
    return CodeMessage(
        subject="Confirmez votre adresse électronique",
        before=(
            "Vous activez votre profil de messagerie de santé et avez indiqué cette adresse"
            " pour être prévenu de vos nouveaux messages. Pour la confirmer, saisissez ce"
            " code sur la page d'activation :",
        ),
        code=code,
        after=(
            f"Ce code est valable {minutes} minutes.",
            _NEVER_SHARE,
            "Si vous n'êtes pas à l'origine de cette demande, ignorez ce courriel :"
            " cette adresse ne sera pas enregistrée.",
        ),
    )


# --- by e-mail ----------------------------------------------------------------------------


def text_body(message: CodeMessage) -> str:
    parts = ["Bonjour,", *message.before, f"    {message.code}", *message.after]
    if message.link is not None:
        parts.append(f"{message.link[0]} : {message.link[1]}")
    parts.append("\n".join(_FOOTER))
    return "\n\n".join(parts) + "\n"


def html_body(message: CodeMessage) -> str:
    e = html.escape
    before = "\n".join(f"<p>{e(t)}</p>" for t in message.before)
    after = "\n".join(f"<p>{e(t)}</p>" for t in message.after)
    link = button(*message.link) if message.link is not None else ""
    inner = f"""{before}
<p style="font-family:'Courier New',Courier,monospace;font-size:1.6em;font-weight:bold;\
letter-spacing:0.1em">{e(message.code)}</p>
{after}
{link}"""
    return html_page(message.subject, inner, _FOOTER)


def compose(
    message: CodeMessage, sender: Sender, *, to: str, message_id: str, at: datetime
) -> bytes:
    """The e-mail as it goes on the wire (CRLF), before the DKIM signature."""
    return service_email(
        sender,
        to=to,
        subject=message.subject,
        text=text_body(message),
        html_part=html_body(message),
        message_id=message_id,
        at=at,
    )


def _sender(settings: Settings) -> Sender:
    n = settings.notify
    return Sender(
        address=n.from_address,
        name=n.from_name,
        webmail_url=n.webmail_url,
        activation_url=n.activation_url,
    )


async def _send_email(
    settings: Settings,
    clock: Clock,
    message: CodeMessage,
    to: str,
    transport: Transport | None,
) -> str:
    """Sign and hand over one e-mail; its Message-ID.  Raises the transport's errors."""
    path = verp_codec(settings).new()  # a bounce names the e-mail, as for notifications
    body = compose(message, _sender(settings), to=to, message_id=path.message_id, at=clock.now())
    signed = await load_signer(settings, clock).sign(body) + body
    own = transport is None
    transport = transport or make_transport(settings, clock)
    try:
        await transport.send(path.envelope_from, [to], signed)
    finally:
        if own:
            await transport.close()
    return path.message_id


# --- by post ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CodeLetter:
    style: LetterStyle
    recipient: tuple[str, ...]  # address block, name line first
    date: datetime
    message: CodeMessage


def _draw_block(canvas: Canvas, x: float, top: float, lines: list[tuple[str, str]]) -> None:
    y = PAGE_HEIGHT - top
    for font, text in lines:
        canvas.setFont(font, 10)
        canvas.drawString(x, y - 10, printable(text))
        y -= 12.5


def render_letter(letter: CodeLetter) -> RenderedLetter:
    """One A4 page, the window-envelope layout of notify/letter.py."""
    printable("")  # registers the embedded fonts (notify/letter.py) before styles use them
    para = printable
    body = ParagraphStyle("body", fontName=FONT, fontSize=10.5, leading=14, spaceAfter=7)
    title = ParagraphStyle("title", parent=body, fontName=FONT_BOLD, fontSize=13, leading=17)
    code = ParagraphStyle(
        "code", parent=body, fontName=FONT_BOLD, fontSize=20, leading=26, alignment=1
    )
    small = ParagraphStyle("small", parent=body, fontSize=8, leading=10)
    style, message = letter.style, letter.message

    def first_page(canvas: Canvas, _doc: BaseDocTemplate) -> None:
        sender = [(FONT_BOLD, style.service_name)] + [(FONT, s) for s in style.service_address]
        _draw_block(canvas, MARGIN, 15 * mm, sender)
        block = list(letter.recipient)
        if len(block) > ADDRESS_LINES:  # keep the name and the locality line
            block = [*block[: ADDRESS_LINES - 1], block[-1]]
        _draw_block(canvas, ADDRESS_LEFT, ADDRESS_TOP, [(FONT, s) for s in block])
        canvas.setFont(FONT, 7.5)
        canvas.drawString(
            MARGIN,
            12 * mm,
            printable(
                f"{style.service_name} — ce courrier ne contient aucune information médicale."
            ),
        )

    out = io.BytesIO()
    doc = BaseDocTemplate(
        out,
        pagesize=A4,
        title="Code d'activation",
        author=style.service_name,
        creator="mssante",
        subject="",
    )
    top = FIRST_FOLD + 2 * mm
    frame = Frame(MARGIN, 20 * mm, PAGE_WIDTH - 2 * MARGIN, PAGE_HEIGHT - top - 20 * mm)
    doc.addPageTemplates([PageTemplate("only", [frame], onPage=first_page)])
    story: list[Flowable] = [
        Paragraph(escape(para(f"Le {french_date(letter.date.astimezone(PARIS).date())}")), body),
        Spacer(1, 4 * mm),
        Paragraph(escape(para("Activation de votre messagerie de santé")), title),
        Paragraph("Madame, Monsieur,", body),
        *(Paragraph(escape(para(t)), body) for t in message.before),
        Spacer(1, 2 * mm),
        Paragraph(escape(para(message.code)), code),
        Spacer(1, 2 * mm),
        *(Paragraph(escape(para(t)), body) for t in message.after),
        Spacer(1, 3 * mm),
        Paragraph(
            escape(
                para(
                    "Ce courrier vous est envoyé parce que nous ne connaissons pas d'adresse"
                    " e-mail où vous écrire. Il ne contient aucune information sur votre santé."
                )
            ),
            small,
        ),
    ]
    doc.build(story)
    if doc.page != 1:
        raise ValueError(f"activation letter takes {doc.page} pages, expected one")
    return RenderedLetter(out.getvalue(), doc.page)


def letter_path(settings: Settings, code: IssuedCode) -> Path:
    """``<data_dir>/postal/activation-<Paris day of issue>/activation-<code id>.pdf``.

    One print batch per day; no INS and no name in file names.
    """
    day = code.issued_at.astimezone(PARIS).date().isoformat()
    return settings.store.data_dir / "postal" / f"activation-{day}" / f"activation-{code.id}.pdf"


def _write_letter(out_dir: Path, rendered: RenderedLetter, row: ManifestRow) -> None:
    """The PDF, then its manifest line (replacing an earlier line for the same file).

    An exclusive lock on the directory's lock file: two commands writing
    the same day's manifest at once both keep their line.
    """
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_file(out_dir / row.file_name, rendered.pdf)
    with (out_dir / ".manifest.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = out_dir / MANIFEST
        rows: list[list[str]] = []
        if manifest.exists():
            with manifest.open(newline="", encoding="utf-8") as f:
                rows = [r for r in list(csv.reader(f))[1:] if r and r[0] != row.file_name]
        rows.append(row.csv_row())
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")  # RFC 4180, as postal.py
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows(rows)
        write_file(manifest, out.getvalue().encode())


def default_style(settings: Settings) -> LetterStyle:
    return LetterStyle(
        service_name=SERVICE_NAME,
        service_address=(),
        webmail_url=settings.notify.webmail_url,
        activation_url=settings.notify.activation_url,
    )


# --- sending -------------------------------------------------------------------------------


async def send_activation_code(
    store: Store,
    settings: Settings,
    clock: Clock,
    patient: Patient,
    code: IssuedCode,
    *,
    transport: Transport | None = None,
    style: LetterStyle | None = None,
    actor: str = "cli",
) -> Channel:
    """Send ``code`` by the channel it was issued for; audited ``activation.code_sent``.

    Raises NoChannelError when the patient no longer has what that channel
    needs, and the transport's errors (TemporaryFailure, PermanentFailure).
    """
    now = clock.now()
    details: dict[str, object] = {"channel": code.channel.value, "code": code.id}
    if code.channel is Channel.EMAIL:
        to = activation_email(patient)
        if to is None:
            raise NoChannelError("no usable e-mail address for this patient")
        message = activation_message(code, settings.notify.activation_url)
        details["message_id"] = await _send_email(settings, clock, message, to, transport)
    else:
        style = style or default_style(settings)
        address = address_block(patient.given_name, patient.family_name, patient.postal_address)
        if address is None:
            raise NoChannelError("no postal address for this patient")
        letter = CodeLetter(
            style, address, code.issued_at, activation_message(code, style.activation_url)
        )
        rendered = await asyncio.to_thread(render_letter, letter)
        path = letter_path(settings, code)
        row = ManifestRow(
            letter_id=code.id,
            file_name=path.name,
            name=recipient_name(patient.given_name, patient.family_name) or address[0],
            address=address,
            pages=rendered.pages,
            events=0,
        )
        await asyncio.to_thread(_write_letter, path.parent, rendered, row)
        details.update(batch=path.parent.name, file=path.name)

    async def job(session: AsyncSession) -> None:
        await audit.append(
            session,
            at=now,
            kind="activation.code_sent",
            actor=actor,
            patient_id=patient.id,
            details=details,
        )

    await store.writer.run(job)
    return code.channel


async def send_email_confirmation(
    store: Store,
    settings: Settings,
    clock: Clock,
    to_address: str,
    code: str,
    *,
    transport: Transport | None = None,
) -> str:
    """E-mail the 6-digit code confirming the personal address typed at activation.

    Returns the Message-ID.  Nothing is recorded: the address belongs to no
    profile until :func:`mssante.store.credentials.activate`.  ``store`` is
    taken so both senders are called alike.
    """
    message = confirmation_message(code, settings.web.email_code_minutes)
    return await _send_email(settings, clock, message, to_address, transport)
