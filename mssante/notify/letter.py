"""One postal activity statement (relevé d'activité) rendered to PDF.

DOMAIN.md 3: a created profile with no e-mail address is told by post.
The letter says that messages are waiting, from whom, and how to read
them; never their subject, attachments or content.  It is rendered from a
plain :class:`Letter` value (no database here) with ReportLab.

Layout (A4, French postal practice for a DL window envelope, NF Z10-011):
the service's block top left, the recipient's block at 110 mm from the
left and 50 mm from the top (the window of a right-window envelope once the
sheet is folded in three), at most 6 lines of at most 38 characters
recommended; the text starts below the first fold (99 mm).

Fonts: Bitstream Vera (shipped inside ReportLab, free to embed), embedded
as a subset with its Unicode map, so French text including "œ" (not in
Latin-1) prints and is extractable.  A character the font lacks is
replaced by its unaccented base letter, else "?" (:func:`printable`).
"""

from __future__ import annotations

import datetime as dt
import enum
import io
import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from xml.sax.saxutils import escape

import reportlab
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import (
    BaseDocTemplate,
    Flowable,
    Frame,
    PageTemplate,
    Paragraph,
    Spacer,
    Table,
    TableStyle,
)

from mssante.french import PARIS, french_date

# Letters are for French patients: dates are shown in Paris time.

FONT = "MssanteVera"
FONT_BOLD = "MssanteVera-Bold"
_FONT_DIR = Path(reportlab.__file__).parent / "fonts"

PAGE_WIDTH, PAGE_HEIGHT = A4
MARGIN = 20 * mm
ADDRESS_LEFT = 110 * mm  # window of a DL right-window envelope
ADDRESS_TOP = 50 * mm
ADDRESS_LINES = 6  # NF Z10-011
FIRST_FOLD = 99 * mm

NEW_MESSAGE = "Nouveau message reçu"
UNKNOWN_SENDER = "Professionnel de santé"


class Access(enum.Enum):
    """How the recipient reads: log in, or activate the profile first."""

    LOG_IN = "log-in"  # activated profile
    ACTIVATE = "activate"  # created (or opposed, for a representative): not activated


@dataclass(frozen=True, slots=True)
class LetterEvent:
    at: datetime  # aware
    sender: str | None  # the professional's display name, None when unknown
    # None: the recipient's own mailbox; else a minor's mailbox, named by the
    # child's given name ("" when unknown).
    child: str | None = None

    @property
    def kind(self) -> str:
        if self.child is None:
            return NEW_MESSAGE
        return f"{NEW_MESSAGE} dans {child_mailbox(self.child)}"


@dataclass(frozen=True, slots=True)
class Letter:
    service_name: str  # the sender block: "Mon espace santé"
    service_address: tuple[str, ...]
    recipient: tuple[str, ...]  # address block, name line first
    date: dt.date
    period_start: dt.date
    period_end: dt.date  # inclusive
    events: tuple[LetterEvent, ...]
    access: Access
    webmail_url: str  # where an activated profile logs in
    activation_url: str  # where a profile not yet activated is activated


@dataclass(frozen=True, slots=True)
class RenderedLetter:
    pdf: bytes
    pages: int


def child_mailbox(given_name: str) -> str:
    return f"la messagerie de votre enfant {given_name}".rstrip()


def short_date(at: datetime) -> str:
    return f"{at.astimezone(PARIS):%d/%m/%Y}"


@cache
def _fonts() -> frozenset[int]:
    """Register the embedded fonts once; the code points they cover."""
    regular = TTFont(FONT, str(_FONT_DIR / "Vera.ttf"))
    pdfmetrics.registerFont(regular)
    pdfmetrics.registerFont(TTFont(FONT_BOLD, str(_FONT_DIR / "VeraBd.ttf")))
    return frozenset(regular.face.charToGlyph)


def printable(text: str) -> str:
    """``text`` with every character the font cannot draw replaced.

    Accented letters missing from the font lose their accent (NFKD base
    letter); anything else becomes "?".  French letters are all covered.
    """
    covered = _fonts()
    out = []
    for ch in text:
        if ord(ch) in covered:
            out.append(ch)
            continue
        base = "".join(
            c
            for c in unicodedata.normalize("NFKD", ch)
            if not unicodedata.combining(c) and ord(c) in covered
        )
        out.append(base or "?")
    return "".join(out)


def _para_text(text: str) -> str:
    return escape(printable(text))


_PAGE_OBJECT = re.compile(rb"/Type\s*/Page(?![A-Za-z])")


def count_pages(pdf: bytes) -> int:
    """Pages of a letter rendered here (ReportLab writes page objects uncompressed)."""
    return len(_PAGE_OBJECT.findall(pdf))


def _styles() -> dict[str, ParagraphStyle]:
    _fonts()
    body = ParagraphStyle("body", fontName=FONT, fontSize=10, leading=13.5, spaceAfter=6)
    return {
        "body": body,
        "title": ParagraphStyle(
            "title", parent=body, fontName=FONT_BOLD, fontSize=13, leading=17, spaceAfter=2
        ),
        "period": ParagraphStyle("period", parent=body, spaceAfter=10),
        "cell": ParagraphStyle("cell", parent=body, fontSize=9, leading=11.5, spaceAfter=0),
        "head": ParagraphStyle(
            "head", parent=body, fontName=FONT_BOLD, fontSize=9, leading=11.5, spaceAfter=0
        ),
        "small": ParagraphStyle("small", parent=body, fontSize=8, leading=10, spaceAfter=0),
    }


def _intro(letter: Letter) -> str:
    children = sorted({e.child for e in letter.events if e.child is not None})
    own = any(e.child is None for e in letter.events)
    where = [*(["votre messagerie de santé"] if own else []), *map(child_mailbox, children)]
    places = ", ".join(where[:-1]) + (" et " if len(where) > 1 else "") + where[-1]
    return (
        f"Des professionnels de santé ont écrit dans {places} ({letter.service_name}). "
        "Voici la liste des messages reçus pendant cette période. Pour protéger "
        "votre vie privée, ce courrier n'indique ni leur objet ni leur contenu."
    )


def _how_to_read(letter: Letter) -> list[str]:
    if letter.access is Access.LOG_IN:
        out = [
            f"Pour lire ces messages, connectez-vous à {letter.service_name} : {letter.webmail_url}"
        ]
    else:
        url = letter.activation_url
        out = [
            f"Votre profil {letter.service_name} n'est pas encore activé. Pour lire ces "
            f"messages, activez-le : rendez-vous sur {url}, choisissez « Activer mon "
            "profil » et laissez-vous guider. Une fois votre profil activé, vous serez "
            "prévenu par e-mail des prochains messages."
        ]
    if any(e.child is not None for e in letter.events):
        out.append(
            "Les messages adressés à votre enfant se lisent depuis votre propre profil, "
            "en tant que représentant légal."
        )
    return out


def _events_table(letter: Letter, styles: dict[str, ParagraphStyle]) -> Table:
    cell, head = styles["cell"], styles["head"]
    rows: list[list[Flowable]] = [
        [Paragraph("Date", head), Paragraph("Expéditeur", head), Paragraph("Événement", head)]
    ]
    for e in sorted(letter.events, key=lambda e: e.at):
        rows.append(
            [
                Paragraph(short_date(e.at), cell),
                Paragraph(_para_text(e.sender or UNKNOWN_SENDER), cell),
                Paragraph(_para_text(e.kind), cell),
            ]
        )
    table = Table(rows, colWidths=[25 * mm, 65 * mm, 80 * mm], repeatRows=1)
    table.setStyle(
        TableStyle(
            [
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ("LINEBELOW", (0, 0), (-1, 0), 0.8, colors.black),
                ("LINEBELOW", (0, 1), (-1, -1), 0.25, colors.grey),
                ("TOPPADDING", (0, 0), (-1, -1), 3),
                ("BOTTOMPADDING", (0, 0), (-1, -1), 3),
            ]
        )
    )
    return table


def _draw_lines(canvas: Canvas, x: float, top: float, lines: list[tuple[str, str]]) -> None:
    y = PAGE_HEIGHT - top
    for font, text in lines:
        canvas.setFont(font, 10)
        canvas.drawString(x, y - 10, printable(text))
        y -= 12.5


def _footer(canvas: Canvas, service_name: str) -> None:
    canvas.setFont(FONT, 7.5)
    canvas.drawString(
        MARGIN,
        12 * mm,
        printable(f"{service_name} — ce courrier ne contient aucune information médicale."),
    )
    canvas.drawRightString(PAGE_WIDTH - MARGIN, 12 * mm, f"Page {canvas.getPageNumber()}")


def render(letter: Letter) -> RenderedLetter:
    """The letter as PDF bytes and its page count."""
    if not letter.events:
        raise ValueError("a letter lists at least one event")
    if not letter.recipient:
        raise ValueError("a letter needs the recipient's address block")
    styles = _styles()

    def first_page(canvas: Canvas, _doc: BaseDocTemplate) -> None:
        sender = [(FONT_BOLD, letter.service_name)] + [(FONT, s) for s in letter.service_address]
        _draw_lines(canvas, MARGIN, 15 * mm, sender)
        block = list(letter.recipient)
        if len(block) > ADDRESS_LINES:  # keep the name and the locality line
            block = [*block[: ADDRESS_LINES - 1], block[-1]]
        _draw_lines(canvas, ADDRESS_LEFT, ADDRESS_TOP, [(FONT, s) for s in block])
        _footer(canvas, letter.service_name)

    def later_page(canvas: Canvas, _doc: BaseDocTemplate) -> None:
        _footer(canvas, letter.service_name)

    out = io.BytesIO()
    width = PAGE_WIDTH - 2 * MARGIN
    doc = BaseDocTemplate(
        out,
        pagesize=A4,
        title="Relevé d'activité",
        author=letter.service_name,
        creator="mssante",
        subject="",
    )
    first_top = FIRST_FOLD + 2 * mm
    doc.addPageTemplates(
        [
            PageTemplate(
                "first",
                [Frame(MARGIN, 20 * mm, width, PAGE_HEIGHT - first_top - 20 * mm, id="f1")],
                onPage=first_page,
                autoNextPageTemplate="later",
            ),
            PageTemplate(
                "later",
                [Frame(MARGIN, 20 * mm, width, PAGE_HEIGHT - 40 * mm, id="f2")],
                onPage=later_page,
            ),
        ]
    )
    start, end = french_date(letter.period_start), french_date(letter.period_end)
    story: list[Flowable] = [
        Paragraph(_para_text(f"Le {french_date(letter.date)}"), styles["body"]),
        Spacer(1, 4 * mm),
        Paragraph("Relevé d'activité de votre messagerie de santé", styles["title"]),
        Paragraph(_para_text(f"Période du {start} au {end}"), styles["period"]),
        Paragraph("Madame, Monsieur,", styles["body"]),
        Paragraph(_para_text(_intro(letter)), styles["body"]),
        _events_table(letter, styles),
        Spacer(1, 5 * mm),
        *(Paragraph(_para_text(t), styles["body"]) for t in _how_to_read(letter)),
        Spacer(1, 3 * mm),
        Paragraph(
            _para_text(
                "Ce courrier vous est envoyé automatiquement parce que nous ne connaissons "
                "pas d'adresse e-mail où vous prévenir. Il ne contient aucune information "
                "sur votre santé."
            ),
            styles["small"],
        ),
    ]
    doc.build(story)
    return RenderedLetter(out.getvalue(), doc.page)
