"""Postal activity statements, the pure parts: periods, address blocks, the PDF itself.

Letters are read back with pypdf (an independent PDF reader), as a print
provider's software or a patient's screen reader would.
"""

from __future__ import annotations

import io
from datetime import UTC, date, datetime, timedelta

import pytest
from pypdf import PdfReader

from mssante.french import french_date
from mssante.notify.letter import (
    Access,
    Letter,
    LetterEvent,
    count_pages,
    printable,
    render,
)
from mssante.notify.postal import (
    Period,
    address_block,
    check_batch_name,
    default_batch_name,
    parse_period,
)

WEBMAIL = "https://webmail.exemple.fr/"
ACTIVATION = "https://webmail.exemple.fr/activer"


def pdf_text(pdf: bytes) -> str:
    return "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)


def letter(events: list[LetterEvent], *, access: Access = Access.ACTIVATE, **kw: object) -> Letter:
    fields: dict[str, object] = {
        "service_name": "Mon espace santé",
        "service_address": ("Service des relevés", "TSA 70000", "75000 Paris"),
        "recipient": ("Zoé Lefèvre-Cœur", "3 rue de l'Église", "13100 Aix-en-Provence"),
        "date": date(2026, 12, 1),
        "period_start": date(2026, 11, 1),
        "period_end": date(2026, 11, 30),
        "events": tuple(events),
        "access": access,
        "webmail_url": WEBMAIL,
        "activation_url": ACTIVATION,
    }
    fields.update(kw)
    return Letter(**fields)  # type: ignore[arg-type]


AT = datetime(2026, 11, 12, 9, 30, tzinfo=UTC)

# --- periods -------------------------------------------------------------------------------


def test_month_period_covers_the_calendar_month() -> None:
    assert Period.month("2026-11") == Period(date(2026, 11, 1), date(2026, 11, 30))
    assert Period.month("2028-02").end == date(2028, 2, 29)
    assert Period.month("2026-12") == Period(date(2026, 12, 1), date(2026, 12, 31))
    assert Period.month("2026-11").label == "2026-11"
    assert Period(date(2026, 11, 1), date(2026, 11, 15)).label == "2026-11-01_2026-11-15"
    assert Period(date(2026, 11, 1), date(2026, 12, 31)).label == "2026-11-01_2026-12-31"


@pytest.mark.parametrize("text", ["2026-13", "2026-00", "2026-1", "nov-2026", "2026-11-01", ""])
def test_bad_month_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="YYYY-MM"):
        Period.month(text)


def test_parse_period_wants_a_month_or_both_days() -> None:
    d1, d2 = date(2026, 11, 3), date(2026, 11, 9)
    assert parse_period(None, d1, d2) == Period(d1, d2)
    assert parse_period("2026-11", None, None) == Period.month("2026-11")
    with pytest.raises(ValueError, match="not both"):
        parse_period("2026-11", d1, None)
    with pytest.raises(ValueError, match="both since and until"):
        parse_period(None, d1, None)
    with pytest.raises(ValueError, match="before it starts"):
        parse_period(None, d2, d1)


def test_period_is_in_paris_time_across_daylight_saving() -> None:
    # March 2026: CET (UTC+1) at the start, CEST (UTC+2) from 29 March.
    start, end = Period.month("2026-03").bounds()
    assert start == datetime(2026, 2, 28, 23, 0, tzinfo=UTC)
    assert end == datetime(2026, 3, 31, 22, 0, tzinfo=UTC)
    november = Period.month("2026-11")
    last_minute = datetime(2026, 11, 30, 22, 59, tzinfo=UTC)  # 23:59 in Paris
    assert november.contains(last_minute)
    assert not november.contains(last_minute + timedelta(minutes=1))  # 00:00 on 1 December
    assert Period.month("2026-12").contains(last_minute + timedelta(minutes=1))
    assert november.contains(datetime(2026, 10, 31, 23, 0, tzinfo=UTC))  # 00:00 on 1 November
    assert not november.contains(datetime(2026, 10, 31, 22, 59, tzinfo=UTC))


def test_batch_names() -> None:
    now = datetime(2026, 12, 1, 7, 5, 9, tzinfo=UTC)
    assert default_batch_name(Period.month("2026-11"), now) == "2026-11-20261201T070509Z"
    assert check_batch_name("nov_2026.b-1") == "nov_2026.b-1"
    for bad in ("", "../x", ".hidden", "a/b", "x" * 65, "é"):
        with pytest.raises(ValueError, match="batch name"):
            check_batch_name(bad)


# --- address block -----------------------------------------------------------------------------


def test_address_block_keeps_a_block_that_names_the_person() -> None:
    block = address_block("Zoé", "Lefèvre", "MME ZOE LEFEVRE\n3 rue de l'Église\n\n13100 Aix ")
    assert block == ("MME ZOE LEFEVRE", "3 rue de l'Église", "13100 Aix")


def test_address_block_puts_the_name_in_front_when_missing() -> None:
    block = address_block("Zoé", "Lefèvre", "3 rue de l'Église\n13100 Aix-en-Provence")
    assert block == ("Zoé Lefèvre", "3 rue de l'Église", "13100 Aix-en-Provence")


@pytest.mark.parametrize("address", [None, "", " \n \n"])
def test_no_address_is_none(address: str | None) -> None:
    assert address_block("Zoé", "Lefèvre", address) is None


# --- the PDF ----------------------------------------------------------------------------------


def test_letter_text_french_accents_and_oe_ligature_survive() -> None:
    events = [
        LetterEvent(AT, "Dr Œdipe Françoise à l'hôpital"),
        LetterEvent(AT + timedelta(days=2), "Laboratoire Cœur & <Santé>"),
    ]
    rendered = render(letter(events))
    text = pdf_text(rendered.pdf)
    for expected in (
        "Mon espace santé",
        "Service des relevés",
        "Zoé Lefèvre-Cœur",
        "3 rue de l'Église",
        "13100 Aix-en-Provence",
        "Le 1er décembre 2026",
        "Relevé d'activité de votre messagerie de santé",
        "Période du 1er novembre 2026 au 30 novembre 2026",
        "Dr Œdipe Françoise à l'hôpital",
        "Laboratoire Cœur & <Santé>",
        "12/11/2026",
        "14/11/2026",
        "Activer mon profil",
        ACTIVATION,
    ):
        assert expected in text, expected
    assert text.count("Nouveau message reçu") == 2
    assert "connectez-vous" not in text
    assert rendered.pages == 1 == count_pages(rendered.pdf)


def test_activated_profile_is_told_to_log_in() -> None:
    text = pdf_text(render(letter([LetterEvent(AT, "Dr A")], access=Access.LOG_IN)).pdf)
    assert f"connectez-vous à Mon espace santé : {WEBMAIL}" in text
    assert "Activer" not in text


def test_unknown_sender_and_child_mailbox() -> None:
    events = [LetterEvent(AT, None, child="Noémie"), LetterEvent(AT, "Dr B", child="")]
    text = " ".join(pdf_text(render(letter(events)).pdf).split())
    assert "Professionnel de santé" in text
    assert "Nouveau message reçu dans la messagerie de votre enfant Noémie" in text
    assert "la messagerie de votre enfant Noémie" in text
    assert "se lisent depuis votre propre profil" in text
    assert "votre messagerie de santé et" not in text  # nothing in the parent's own mailbox


def test_long_letter_runs_over_pages_with_the_table_header_repeated() -> None:
    events = [LetterEvent(AT + timedelta(hours=i), f"Dr Numéro {i:03d}") for i in range(90)]
    rendered = render(letter(events))
    reader = PdfReader(io.BytesIO(rendered.pdf))
    assert rendered.pages == len(reader.pages) == count_pages(rendered.pdf) >= 3
    pages = [p.extract_text() for p in reader.pages]
    assert all("Expéditeur" in p for p in pages[:-1])
    text = "\n".join(pages)
    assert all(f"Dr Numéro {i:03d}" in text for i in range(90))
    # The address block is on the first page only (window envelope).
    assert "Zoé Lefèvre-Cœur" in pages[0]
    assert all("Zoé Lefèvre-Cœur" not in p for p in pages[1:])


def test_characters_the_font_lacks_are_replaced_not_dropped() -> None:
    assert printable("Ștefan Kovács Œ") == "Stefan Kovács Œ"
    assert printable("漢") == "?"
    text = pdf_text(render(letter([LetterEvent(AT, "Dr Ștefan 漢")])).pdf)
    assert "Dr Stefan ?" in text


def test_letter_needs_events_and_an_address() -> None:
    with pytest.raises(ValueError, match="event"):
        render(letter([]))
    with pytest.raises(ValueError, match="address"):
        render(letter([LetterEvent(AT, "Dr A")], recipient=()))


def test_french_dates() -> None:
    assert french_date(date(2026, 8, 1)) == "1er août 2026"
    assert french_date(date(2026, 2, 14)) == "14 février 2026"
