"""Postal activity statements end to end (issue #6 part 5).

Real messages go through the real gateway (SMTP on port 0) into the real
store, on SQLite and PostgreSQL; the batch then writes the letters, which
are read back with pypdf.  Subjects, bodies and attachment names carry
markers that must never reach a letter, the manifest or the audit trail.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pypdf import PdfReader
from sqlalchemy import func, select

from mssante import demo
from mssante.app import Gateway
from mssante.cli import main
from mssante.notify import postal
from mssante.notify.postal import LetterStyle, Period, PostalReport, run_batch
from mssante.notify.postal_cli import postal_batch
from mssante.routing.ins import with_key
from mssante.store import directory as dirops
from mssante.store.audit import verify_stored_chain
from mssante.store.directory import PatientRecord
from mssante.store.models import (
    AuditEvent,
    Channel,
    Notification,
    NotificationStatus,
    PostalLetter,
    ProfileStatus,
)
from tests.conftest import FakeClock
from tests.test_gateway import DOCTOR, addr, patient_id, send

NOVEMBER = Period.month("2026-11")
STYLE = LetterStyle(
    service_name="Mon espace santé",
    service_address=("Service des relevés", "75000 Paris"),
    webmail_url="https://webmail.exemple.fr/",
    activation_url="https://webmail.exemple.fr/activer",
)
# What a health message may say; none of it may be printed.
MARKERS = ("Zq7", "sérologie", "VIH", "charge virale", "biopsie")

REPRESENTATIVE = with_key("2750713123907")
CHILD = with_key("1180713123908")
NO_ADDRESS = with_key("1820713123909")


def health_message(to: str, n: int, *, sender_name: str = "Dr Élodie Œuvray") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"{sender_name} <{DOCTOR}>"
    msg["To"] = to
    msg["Subject"] = f"Résultats sérologie VIH Zq7Subj{n}"
    msg["Message-ID"] = make_msgid(domain="chu-exemple.mssante.fr")
    msg.set_content(f"Votre charge virale est indétectable. Zq7Body{n}\n")
    msg.add_attachment(
        b"%PDF-1.4 Zq7",
        maintype="application",
        subtype="pdf",
        filename=f"Zq7Attach{n}-biopsie.pdf",
    )
    return msg


async def deliver(gw: Gateway, ins: str, n: int, **kw: Any) -> None:
    errors, _ = await send(gw, health_message(addr(ins), n, **kw))
    assert not errors


async def add_patients(gw: Gateway, clock: FakeClock, *records: PatientRecord) -> None:
    async def job(session: Any) -> None:
        for record in records:
            await dirops.upsert_patient(session, record, at=clock.now(), actor="test")
        for record in records:
            if record.representatives:
                patient = await dirops.get_patient(session, record.ins)
                assert patient is not None
                await dirops.set_links(session, patient, record, at=clock.now())

    await gw.store.writer.run(job)


async def batch(
    gw: Gateway, clock: FakeClock, out: Path, name: str = "b1", period: Period = NOVEMBER
) -> PostalReport:
    return await run_batch(
        gw.store.reads,
        gw.store.writer_sessions,
        gw.store.keyring,
        period=period,
        out_dir=out,
        batch=name,
        clock=clock,
        style=STYLE,
        pseudonym=gw.pseudonym,
    )


def pdf_text(path: Path) -> str:
    text = "\n".join(p.extract_text() for p in PdfReader(path).pages)
    return " ".join(text.split())  # table cells wrap: compare on single spaces


def manifest(out: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO((out / "manifest.csv").read_text("utf-8"))))


def assert_no_health_content(text: str) -> None:
    for marker in MARKERS:
        assert marker not in text, marker


async def postal_rows(gw: Gateway) -> list[Notification]:
    async with gw.store.reads() as s:
        rows = await s.scalars(
            select(Notification)
            .where(Notification.channel == Channel.POSTAL)
            .order_by(Notification.id)
        )
        return list(rows)


async def letters(gw: Gateway) -> list[PostalLetter]:
    async with gw.store.reads() as s:
        return list(await s.scalars(select(PostalLetter).order_by(PostalLetter.id)))


# --- one letter, its content, its records --------------------------------------------------


async def test_letter_lists_events_and_no_health_content(
    gateway: Gateway, clock: FakeClock, tmp_path: Path
) -> None:
    await deliver(gateway, demo.CREATED_POSTAL, 1)
    clock.advance(days=2)
    await deliver(gateway, demo.CREATED_POSTAL, 2, sender_name="Laboratoire Cœur & Vie")
    await deliver(gateway, demo.ACTIVATED, 3)  # told by e-mail: no letter
    out = tmp_path / "out"

    report = await batch(gateway, clock, out)

    assert (report.letters, report.events, report.skipped, report.orphans) == (1, 2, [], [])
    (letter,) = await letters(gateway)
    assert sorted(p.name for p in out.iterdir()) == [f"{letter.id}.pdf", "manifest.csv"]
    assert letter.file_name == f"{letter.id}.pdf"
    assert (letter.batch, letter.events, letter.created_at) == ("b1", 2, clock.now())
    assert (letter.period_start, letter.period_end) == (NOVEMBER.start, NOVEMBER.end)
    assert letter.recipient_id == await patient_id(gateway, demo.CREATED_POSTAL)

    text = pdf_text(out / letter.file_name)
    for expected in (
        "Mon espace santé",
        "Louise Bernard",
        "8 chemin des Vignes",
        "13100 Aix-en-Provence",
        "Le 25 novembre 2026",
        "Relevé d'activité de votre messagerie de santé",
        "Période du 1er novembre 2026 au 30 novembre 2026",
        "23/11/2026 Dr Élodie Œuvray Nouveau message reçu",
        "25/11/2026 Laboratoire Cœur & Vie Nouveau message reçu",
        "Activer mon profil",
        STYLE.activation_url,
    ):
        assert expected in text, expected
    assert_no_health_content(text)
    assert demo.CREATED_POSTAL not in text
    assert DOCTOR not in text  # DOMAIN.md 4: the name, never the address

    (row,) = manifest(out)
    assert row == {
        "file": letter.file_name,
        "letter": str(letter.id),
        "recipient_name": "Louise Bernard",
        "address_1": "Louise Bernard",
        "address_2": "8 chemin des Vignes",
        "address_3": "13100 Aix-en-Provence",
        "address_4": "",
        "address_5": "",
        "address_6": "",
        "pages": "1",
        "events": "2",
    }
    assert_no_health_content((out / "manifest.csv").read_text("utf-8"))

    rows = await postal_rows(gateway)
    assert len(rows) == 2
    assert {(r.status, r.letter_id, r.sent_at) for r in rows} == {
        (NotificationStatus.SENT, letter.id, clock.now())
    }
    async with gateway.store.reads() as s:
        (event,) = await s.scalars(
            select(AuditEvent).where(AuditEvent.kind == "notification.postal")
        )
        assert (await verify_stored_chain(s))[1] == []
    assert event.patient_id == letter.recipient_id
    assert event.details["letter"] == letter.id
    assert event.details["events"] == 2
    assert event.details["notifications"] == [r.id for r in rows]
    assert_no_health_content(json.dumps(event.details, ensure_ascii=False))


async def test_running_a_period_again_makes_no_duplicate(
    gateway: Gateway, clock: FakeClock, tmp_path: Path
) -> None:
    await deliver(gateway, demo.CREATED_POSTAL, 1)
    first = await batch(gateway, clock, tmp_path / "first", "first")
    assert first.letters == 1

    again = await batch(gateway, clock, tmp_path / "again", "again")
    assert (again.letters, again.events, again.manifest) == (0, 0, None)
    assert not (tmp_path / "again").exists()
    assert len(await letters(gateway)) == 1

    # A message arriving later in the period is in a new letter, alone.
    clock.advance(days=1)
    await deliver(gateway, demo.CREATED_POSTAL, 2, sender_name="Dr Tardif")
    later = await batch(gateway, clock, tmp_path / "later", "later")
    assert (later.letters, later.events) == (1, 1)
    _, second = await letters(gateway)
    text = pdf_text(tmp_path / "later" / second.file_name)
    assert "Dr Tardif" in text and "Œuvray" not in text
    async with gateway.store.reads() as s:
        audited = await s.scalar(
            select(func.count())
            .select_from(AuditEvent)
            .where(AuditEvent.kind == "notification.postal")
        )
    assert audited == 2


async def test_period_boundary_is_midnight_in_paris(
    gateway: Gateway, clock: FakeClock, tmp_path: Path
) -> None:
    clock.advance(days=7, hours=13, minutes=59)  # 2026-11-30 22:59 UTC = 23:59 in Paris
    await deliver(gateway, demo.CREATED_POSTAL, 1, sender_name="Dr Novembre")
    clock.advance(minutes=1)  # 23:00 UTC: 00:00 on 1 December in Paris
    await deliver(gateway, demo.CREATED_POSTAL, 2, sender_name="Dr Décembre")

    nov = await batch(gateway, clock, tmp_path / "nov", "nov")
    dec = await batch(gateway, clock, tmp_path / "dec", "dec", Period.month("2026-12"))

    assert (nov.events, dec.events) == (1, 1)
    nov_letter, dec_letter = await letters(gateway)
    nov_text = pdf_text(tmp_path / "nov" / nov_letter.file_name)
    dec_text = pdf_text(tmp_path / "dec" / dec_letter.file_name)
    assert "30/11/2026 Dr Novembre" in nov_text and "Décembre" not in nov_text
    assert "01/12/2026 Dr Décembre" in dec_text and "Novembre" not in dec_text
    assert "Période du 1er décembre 2026 au 31 décembre 2026" in dec_text


async def test_minor_letter_goes_to_the_representative_naming_the_child(
    gateway: Gateway, clock: FakeClock, tmp_path: Path
) -> None:
    await add_patients(
        gateway,
        clock,
        PatientRecord(
            ins=REPRESENTATIVE,
            status=ProfileStatus.CREATED,
            given_name="Zoé",
            family_name="Lefèvre",
            postal_address="3 rue de l'Église\n13100 Aix-en-Provence",
        ),
        PatientRecord(
            ins=CHILD,
            status=ProfileStatus.CREATED,
            given_name="Noémie",
            family_name="Lefèvre-Martin",
            representatives=(REPRESENTATIVE, demo.ACTIVATED),
        ),
    )
    await deliver(gateway, CHILD, 1)

    report = await batch(gateway, clock, tmp_path / "out")

    assert (report.letters, report.events) == (1, 1)  # the other parent: by e-mail
    (letter,) = await letters(gateway)
    assert letter.recipient_id == await patient_id(gateway, REPRESENTATIVE)
    text = pdf_text(tmp_path / "out" / letter.file_name)
    assert "Zoé Lefèvre 3 rue de l'Église 13100 Aix-en-Provence" in text
    assert "Nouveau message reçu dans la messagerie de votre enfant Noémie" in text
    assert "se lisent depuis votre propre profil" in text
    assert CHILD not in text and "Lefèvre-Martin" not in text
    assert_no_health_content(text)
    (row,) = manifest(tmp_path / "out")
    assert (row["recipient_name"], row["address_1"]) == ("Zoé Lefèvre", "Zoé Lefèvre")
    async with gateway.store.reads() as s:
        event = await s.scalar(select(AuditEvent).where(AuditEvent.kind == "notification.postal"))
    assert event is not None
    assert event.details["mailboxes"] == [await patient_id(gateway, CHILD)]


async def test_patient_without_address_is_skipped_and_left_pending(
    gateway: Gateway, clock: FakeClock, tmp_path: Path
) -> None:
    await add_patients(
        gateway,
        clock,
        PatientRecord(
            ins=NO_ADDRESS, status=ProfileStatus.CREATED, given_name="Paul", family_name="Sans"
        ),
    )
    await deliver(gateway, NO_ADDRESS, 1)
    await deliver(gateway, demo.CREATED_POSTAL, 2)

    report = await batch(gateway, clock, tmp_path / "out")

    assert report.letters == 1
    assert report.skipped == [gateway.pseudonym(NO_ADDRESS)]
    assert NO_ADDRESS not in "\n".join(postal_summary(report))
    nobody = await patient_id(gateway, NO_ADDRESS)
    left = [r for r in await postal_rows(gateway) if r.recipient_id == nobody]
    assert [(r.status, r.letter_id) for r in left] == [(NotificationStatus.PENDING, None)]
    assert [r["recipient_name"] for r in manifest(tmp_path / "out")] == ["Louise Bernard"]


def postal_summary(report: PostalReport) -> list[str]:
    from mssante.notify.postal_cli import summary

    return summary(report)


# --- crash between the file and the commit --------------------------------------------------


async def test_crash_after_the_file_leaves_an_orphan_and_no_record(
    gateway: Gateway, clock: FakeClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await deliver(gateway, demo.CREATED_POSTAL, 1)
    out = tmp_path / "out"
    real_write = postal.write_file

    def write_then_crash(path: Path, data: bytes, **kw: Any) -> None:
        real_write(path, data, **kw)
        if path.suffix == ".pdf":
            raise OSError("power cut after the letter was written")

    monkeypatch.setattr(postal, "write_file", write_then_crash)
    with pytest.raises(OSError, match="power cut"):
        await batch(gateway, clock, out, "b1")
    monkeypatch.setattr(postal, "write_file", real_write)

    (orphan,) = [p.name for p in out.glob("*.pdf")]
    assert await letters(gateway) == []
    assert [r.status for r in await postal_rows(gateway)] == [NotificationStatus.PENDING]

    report = await batch(gateway, clock, out, "b1")

    (letter,) = await letters(gateway)
    assert report.letters == 1
    assert [r["file"] for r in manifest(out)] == [letter.file_name]
    if gateway.settings.store.url().startswith("sqlite"):
        # SQLite reuses the id of the rolled-back row: the orphan was replaced.
        assert (letter.file_name, report.orphans) == (orphan, [])
    else:
        # PostgreSQL sequences never go back: the orphan stays, reported.
        assert letter.file_name != orphan
        assert report.orphans == [orphan]
        assert any(orphan in line for line in postal_summary(report))


async def test_same_batch_again_completes_its_manifest(
    gateway: Gateway, clock: FakeClock, tmp_path: Path
) -> None:
    await deliver(gateway, demo.CREATED_POSTAL, 1)
    out = tmp_path / "out"
    assert (await batch(gateway, clock, out, "b1")).letters == 1
    await add_patients(
        gateway,
        clock,
        PatientRecord(
            ins=REPRESENTATIVE,
            status=ProfileStatus.CREATED,
            given_name="Zoé",
            family_name="Lefèvre",
            postal_address="Zoé Lefèvre\n3 rue de l'Église\n13100 Aix-en-Provence",
        ),
    )
    await deliver(gateway, REPRESENTATIVE, 2)

    report = await batch(gateway, clock, out, "b1")

    assert (report.letters, report.manifest_letters) == (1, 2)
    rows = manifest(out)
    assert [r["recipient_name"] for r in rows] == ["Louise Bernard", "Zoé Lefèvre"]
    assert [r["pages"] for r in rows] == ["1", "1"]
    with pytest.raises(postal.BatchError, match="is for 2026-11-01"):
        await batch(gateway, clock, out, "b1", Period.month("2026-12"))
    with pytest.raises(postal.BatchError, match="give the batch's own output directory"):
        await batch(gateway, clock, tmp_path / "elsewhere", "b1")


# --- the command ------------------------------------------------------------------------------


async def test_postal_batch_command(gateway: Gateway, clock: FakeClock, tmp_path: Path) -> None:
    await deliver(gateway, demo.CREATED_POSTAL, 1)
    runner = CliRunner()
    store = gateway.settings.store
    config = tmp_path / "mssante.toml"
    config.write_text(
        f"[store]\ndata_dir = {json.dumps(str(store.data_dir))}\n"
        f"database_url = {json.dumps(store.url())}\n"
    )

    def run(*args: str) -> Any:
        return runner.invoke(postal_batch, list(args), obj=gateway.settings)

    # As an operator types it: `mssante notify postal-batch`.
    result = await asyncio.to_thread(
        runner.invoke,
        main,
        ["--config", str(config), "notify", "postal-batch", "--period=2026-11", "--batch=nov"],
    )
    assert result.exit_code == 0, result.output
    out = gateway.settings.store.data_dir / "postal" / "nov"
    assert "1 letters (1 events)" in result.output
    assert f"manifest {out / 'manifest.csv'} (1 letters)" in result.output
    (pdf,) = out.glob("*.pdf")
    text = pdf_text(pdf)
    assert "Louise Bernard" in text
    assert "Mon espace santé" in text
    assert gateway.settings.notify.activation_url in text
    assert_no_health_content(text)

    again = await asyncio.to_thread(run, "--since", "2026-11-01", "--until", "2026-11-30")
    assert again.exit_code == 0, again.output
    assert "nothing pending for this period" in again.output

    bad = await asyncio.to_thread(run, "--period", "2026-11", "--since", "2026-11-01")
    assert bad.exit_code == 2
    assert "not both" in bad.output
