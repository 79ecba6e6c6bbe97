"""Tests for mssante.store.mime: streaming metadata extraction of stored messages."""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import random
import tracemalloc
from email.message import EmailMessage
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mssante.store import mime
from mssante.store.mime import AttachmentInfo, MessageSummary, summarize, summarize_bytes

# --------------------------------------------------------------------------- helpers


def _smtp_bytes(msg: EmailMessage) -> bytes:
    """The message as it travels over SMTP (CRLF line endings)."""
    return msg.as_bytes(policy=email.policy.SMTP)


def _crlf(text: str, charset: str = "utf-8") -> bytes:
    """Hand-written message text with LF line endings -> CRLF bytes."""
    return text.replace("\n", "\r\n").encode(charset)


def _write(tmp_path: Path, data: bytes, name: str = "message.eml") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _summarize(tmp_path: Path, data: bytes | EmailMessage) -> MessageSummary:
    raw = _smtp_bytes(data) if isinstance(data, EmailMessage) else data
    summary = summarize(_write(tmp_path, raw))
    assert summary == summarize_bytes(raw)
    return summary


def _pdf(size: int, seed: int = 0) -> bytes:
    body = random.Random(seed).randbytes(max(0, size - 9))
    return (b"%PDF-1.7\n" + body)[:size]


def _basic_message(subject: str = "Compte rendu") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Dr Jeanne Martin <jeanne.martin@chu-exemple.mssante.fr>"
    msg["To"] = "1234567890123@patient.mssante.fr"
    msg["Subject"] = subject
    msg["Date"] = "Tue, 04 Jun 2024 10:15:00 +0200"
    msg["Message-ID"] = "<cr-42@chu-exemple.mssante.fr>"
    msg.set_content("Bonjour,\nveuillez trouver ci-joint votre compte rendu.\n")
    return msg


def _no_defects(summary: MessageSummary) -> None:
    assert summary.defects == []
    assert summary.broken is False


# --------------------------------------------------------------------------- headers


def test_plain_text_message_every_field(tmp_path: Path) -> None:
    raw = _crlf(
        "Return-Path: <jeanne.martin@chu-exemple.mssante.fr>\n"
        "From: =?utf-8?q?Dr_Jeanne_Andr=C3=A9?= <Jeanne.Martin@CHU-Exemple.MSSante.fr>\n"
        "To: =?utf-8?q?Patient_H=C3=A9l=C3=A8ne?= <1234567890123@patient.mssante.fr>,\n"
        " autre@patient.mssante.fr\n"
        "Cc: Secretariat <secretariat@chu-exemple.mssante.fr>\n"
        "Subject: =?utf-8?q?R=C3=A9sultats?=\n"
        "Date: Tue, 04 Jun 2024\n 10:15:00 +0200\n"
        "Message-ID:  <cr-42@chu-exemple.mssante.fr> \n"
        "In-Reply-To: <question-1@patient.mssante.fr>\n"
        "References: <thread-0@chu-exemple.mssante.fr>\n"
        "\t<question-1@patient.mssante.fr>\n"
        "Reply-To: Service Cardio <Cardio@CHU-Exemple.MSSante.fr>\n"
        "Disposition-Notification-To: <Accuse@CHU-Exemple.MSSante.fr>\n"
        "X-MSS-MES: FIN\n"
        "X-MSS-NIL: 1\n"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=utf-8\n"
        "Content-Transfer-Encoding: 8bit\n"
        "\n"
        "Bonjour, vos résultats sont normaux.\n"
    )
    summary = _summarize(tmp_path, raw)
    assert summary == MessageSummary(
        from_address="jeanne.martin@chu-exemple.mssante.fr",
        from_name="Dr Jeanne André",
        to="Patient Hélène <1234567890123@patient.mssante.fr>, autre@patient.mssante.fr",
        cc="Secretariat <secretariat@chu-exemple.mssante.fr>",
        subject="Résultats",
        date="Tue, 04 Jun 2024 10:15:00 +0200",
        message_id="<cr-42@chu-exemple.mssante.fr>",
        in_reply_to=["<question-1@patient.mssante.fr>"],
        references=["<thread-0@chu-exemple.mssante.fr>", "<question-1@patient.mssante.fr>"],
        reply_to="cardio@chu-exemple.mssante.fr",
        mss_headers={"X-MSS-MES": "FIN", "X-MSS-NIL": "1"},
        disposition_notification_to="accuse@chu-exemple.mssante.fr",
        attachments=[],
        defects=[],
        broken=False,
    )


def test_email_message_single_part(tmp_path: Path) -> None:
    summary = _summarize(tmp_path, _basic_message())
    assert summary.from_address == "jeanne.martin@chu-exemple.mssante.fr"
    assert summary.from_name == "Dr Jeanne Martin"
    assert summary.to == "1234567890123@patient.mssante.fr"
    assert summary.cc is None
    assert summary.subject == "Compte rendu"
    assert summary.date == "Tue, 04 Jun 2024 10:15:00 +0200"
    assert summary.message_id == "<cr-42@chu-exemple.mssante.fr>"
    assert summary.in_reply_to == []
    assert summary.references == []
    assert summary.reply_to is None
    assert summary.disposition_notification_to is None
    assert summary.mss_headers == {}
    assert summary.attachments == []
    _no_defects(summary)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("=?utf-8?q?R=C3=A9sultats?=", "Résultats"),
        ("=?UTF-8?B?UsOpc3VsdGF0cw==?=", "Résultats"),
        ("=?iso-8859-1?q?R=E9sultats?= de =?utf-8?q?l=E2=80=99IRM?=", "Résultats de l’IRM"),
        ("=?utf-8?q?R=C3=A9sultats_?=\n =?utf-8?q?d=27analyse?=", "Résultats d'analyse"),
        ("Re: compte rendu\n  du 3 juin", "Re: compte rendu  du 3 juin"),
        ("", ""),
        ("=?x-unknown?q?abc?=", "abc"),
    ],
)
def test_subject_decoding(tmp_path: Path, header: str, expected: str) -> None:
    raw = _crlf(f"From: a@b.fr\nSubject: {header}\n\nbody\n")
    summary = _summarize(tmp_path, raw)
    assert summary.subject == expected
    assert summary.broken is False


def test_subject_absent_is_none(tmp_path: Path) -> None:
    summary = _summarize(tmp_path, _crlf("From: a@b.fr\n\nbody\n"))
    assert summary.subject is None
    assert summary.message_id is None
    _no_defects(summary)


def test_raw_utf8_and_latin1_headers(tmp_path: Path) -> None:
    utf8 = _summarize(tmp_path, _crlf("From: Hélène <h@b.fr>\nSubject: Réponse\n\nx\n"))
    assert utf8.subject == "Réponse"
    assert utf8.from_name == "Hélène"
    _no_defects(utf8)

    latin1 = _summarize(
        tmp_path, _crlf("From: Hélène <h@b.fr>\nSubject: Réponse œuf\n\nx\n", "cp1252")
    )
    assert latin1.subject == "Réponse œuf"
    assert latin1.from_name == "Hélène"
    assert latin1.broken is False
    assert "message: Subject header is not valid UTF-8" in latin1.defects


def test_x_mss_headers(tmp_path: Path) -> None:
    msg = _basic_message()
    msg["X-MSS-MES"] = "FIN"
    msg["X-MSS-NIL"] = "  INS-NIR-1234567890123  "
    msg["X-Mss-Type-Doc"] = "CR"
    msg["x-mss-mes"] = "DEBUT"  # later duplicate, other case: first occurrence wins
    msg["X-MSSANTE-Other"] = "not an X-MSS- header"
    raw = _smtp_bytes(msg).replace(b"X-Mss-Type-Doc: CR", b"X-Mss-Type-Doc:\r\n C\r\n\tR")
    summary = _summarize(tmp_path, raw)
    assert summary.mss_headers == {
        "X-MSS-MES": "FIN",
        "X-MSS-NIL": "INS-NIR-1234567890123",
        "X-Mss-Type-Doc": "C\tR",
    }
    _no_defects(summary)


def test_references_and_in_reply_to(tmp_path: Path) -> None:
    raw = _crlf(
        "From: a@b.fr\n"
        "Message-ID: no-brackets@b.fr\n"
        "In-Reply-To: (reply to) <m2@b.fr> garbage <m3@b.fr>\n"
        "References: <m0@b.fr> <m1@b.fr>\n"
        "   <m2@b.fr>\n"
        "\t<bad id@b.fr> <m3@b.fr>\n"
        "\n"
        "x\n"
    )
    summary = _summarize(tmp_path, raw)
    assert summary.in_reply_to == ["<m2@b.fr>", "<m3@b.fr>"]
    assert summary.references == ["<m0@b.fr>", "<m1@b.fr>", "<m2@b.fr>", "<m3@b.fr>"]
    assert summary.message_id == "<no-brackets@b.fr>"
    assert summary.broken is False
    assert summary.defects == ["message: Message-ID without angle brackets"]


def test_duplicate_singleton_header_first_wins(tmp_path: Path) -> None:
    raw = _crlf("From: first@b.fr\nSubject: one\nSubject: two\nFrom: second@b.fr\n\nx\n")
    summary = _summarize(tmp_path, raw)
    assert summary.subject == "one"
    assert summary.from_address == "first@b.fr"
    assert summary.broken is False
    assert "message: more than one Subject header; the first is used" in summary.defects


@pytest.mark.parametrize(
    ("header", "address", "name"),
    [
        ('"Martin, Jeanne" <J.Martin@B.fr>', "j.martin@b.fr", "Martin, Jeanne"),
        ("j.martin@b.fr (Jeanne Martin)", "j.martin@b.fr", None),
        ("Jeanne Martin", None, None),
        ("<>", None, None),
        ("Jean <jean@", None, None),  # crashes the stdlib parser: falls back
        ("undisclosed-recipients:;", None, None),
        ("Groupe: Anne <anne@b.fr>, bob@b.fr;", "anne@b.fr", "Anne"),
    ],
)
def test_from_header_variants(
    tmp_path: Path, header: str, address: str | None, name: str | None
) -> None:
    summary = _summarize(tmp_path, _crlf(f"From: {header}\n\nx\n"))
    assert summary.from_address == address
    assert summary.from_name == name
    assert summary.broken is False


# --------------------------------------------------------------------------- attachments


def test_multipart_mixed_with_5mb_pdf(tmp_path: Path) -> None:
    pdf = _pdf(5 * 1024 * 1024 + 2)  # not a multiple of 3: exercises the "=" padding
    msg = _basic_message()
    msg.add_attachment(pdf, maintype="application", subtype="pdf", filename="compte-rendu.pdf")
    raw = _smtp_bytes(msg)
    assert b"Content-Transfer-Encoding: base64" in raw
    summary = _summarize(tmp_path, raw)
    assert summary.attachments == [
        AttachmentInfo(
            position=0, filename="compte-rendu.pdf", content_type="application/pdf", size=len(pdf)
        )
    ]
    assert summary.subject == "Compte rendu"
    _no_defects(summary)


def test_alternative_inside_mixed(tmp_path: Path) -> None:
    msg = _basic_message()
    msg.add_alternative("<p>Bonjour</p>", subtype="html")
    msg.add_attachment(_pdf(1000), maintype="application", subtype="pdf", filename="a.pdf")
    msg.add_attachment(b"\x89PNG....", maintype="image", subtype="png", filename="b.png")
    assert msg.get_content_type() == "multipart/mixed"
    summary = _summarize(tmp_path, msg)
    assert summary.attachments == [
        AttachmentInfo(0, "a.pdf", "application/pdf", 1000),
        AttachmentInfo(1, "b.png", "image/png", 8),
    ]
    _no_defects(summary)


def test_nested_related_inline_and_attached_message(tmp_path: Path) -> None:
    inner = _basic_message("Message transféré")
    inner.add_attachment(_pdf(300), maintype="application", subtype="pdf", filename="inner.pdf")

    msg = _basic_message()
    msg.add_alternative("<p>Voir l'image <img src='cid:img1'></p>", subtype="html")
    html = next(p for p in msg.walk() if p.get_content_type() == "text/html")
    assert isinstance(html, EmailMessage)
    html.add_related(b"GIF89a-image", maintype="image", subtype="gif", cid="<img1>")
    msg.add_attachment(inner)  # message/rfc822: one attachment, not recursed into
    msg.add_attachment("a;b\n1;2\n", subtype="csv", filename="mesures.csv")
    msg.add_attachment("note\n", disposition="attachment")  # text/plain attachment, no name
    raw = _smtp_bytes(msg)
    boundary = msg.get_boundary()
    assert boundary is not None
    start = raw.index(b"\r\n\r\n", raw.index(b"Content-Type: message/rfc822")) + 4
    rfc822_size = raw.index(b"\r\n--" + boundary.encode(), start) - start
    assert raw[start:].startswith(b"From:") or raw[start:].startswith(b"Subject:")

    summary = _summarize(tmp_path, raw)
    assert summary.attachments == [
        AttachmentInfo(0, None, "image/gif", len(b"GIF89a-image")),
        AttachmentInfo(1, None, "message/rfc822", rfc822_size),
        AttachmentInfo(2, "mesures.csv", "text/csv", len(b"a;b\r\n1;2\r\n")),
        AttachmentInfo(3, None, "text/plain", len(b"note\r\n")),
    ]
    _no_defects(summary)


def test_filename_rfc2231_from_email_message(tmp_path: Path) -> None:
    name = "Compte rendu – échographie 04/06.pdf"
    msg = _basic_message()
    msg.add_attachment(_pdf(100), maintype="application", subtype="pdf", filename=name)
    raw = _smtp_bytes(msg)
    assert b"filename*=utf-8''" in raw
    summary = _summarize(tmp_path, raw)
    assert summary.attachments == [AttachmentInfo(0, name, "application/pdf", 100)]
    _no_defects(summary)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        # RFC 2231 continuations with charset
        (
            "Content-Type: application/pdf\n"
            "Content-Disposition: attachment;\n"
            " filename*0*=UTF-8''R%C3%A9sultats%20;\n"
            " filename*1*=IRM.pdf",
            "Résultats IRM.pdf",
        ),
        # RFC 2231 in the Content-Type name
        ("Content-Type: application/pdf; name*=iso-8859-1''r%E9sum%E9.pdf", "résumé.pdf"),
        # RFC 2047 in a quoted filename (not standard, very common)
        (
            'Content-Type: application/pdf\nContent-Disposition: attachment; filename="'
            '=?utf-8?q?R=C3=A9sultats_IRM.pdf?="',
            "Résultats IRM.pdf",
        ),
        # RFC 2047 in the Content-Type name only, with text after the encoded-word
        (
            'Content-Type: application/pdf; name="=?utf-8?b?w6ljaG8=?=.pdf"',
            "écho.pdf",
        ),
        # raw UTF-8 (SMTPUTF8 / RFC 6532)
        (
            'Content-Type: application/pdf\nContent-Disposition: attachment; filename="Résumé.pdf"',
            "Résumé.pdf",
        ),
        # disposition filename wins over Content-Type name
        (
            'Content-Type: application/pdf; name="ct.pdf"\n'
            'Content-Disposition: inline; filename="cd.pdf"',
            "cd.pdf",
        ),
        # empty filename counts as absent
        ('Content-Type: application/pdf\nContent-Disposition: attachment; filename=""', None),
    ],
)
def test_filename_decoding(tmp_path: Path, headers: str, expected: str | None) -> None:
    raw = _crlf(
        "From: a@b.fr\n"
        'Content-Type: multipart/mixed; boundary="b1"\n'
        "\n"
        "--b1\n"
        "Content-Type: text/plain\n"
        "\n"
        "texte\n"
        "--b1\n"
        f"{headers}\n"
        "Content-Transfer-Encoding: base64\n"
        "\n"
        "JVBERi0=\n"
        "--b1--\n"
    )
    summary = _summarize(tmp_path, raw)
    assert summary.attachments == [AttachmentInfo(0, expected, "application/pdf", 5)]
    _no_defects(summary)


def test_latin1_raw_filename(tmp_path: Path) -> None:
    raw = _crlf(
        "From: a@b.fr\n"
        "Content-Type: multipart/mixed; boundary=b1\n"
        "\n"
        "--b1\n"
        'Content-Type: application/pdf; name="Résumé.pdf"\n'
        "\n"
        "%PDF\n"
        "--b1--\n",
        "latin-1",
    )
    summary = _summarize(tmp_path, raw)
    assert summary.attachments == [AttachmentInfo(0, "Résumé.pdf", "application/pdf", 4)]
    assert summary.broken is False


def test_quoted_printable_8bit_and_binary_sizes_match_stdlib(tmp_path: Path) -> None:
    msg = _basic_message()
    text = "é" * 100 + " fin de ligne  \n" + "x" * 200 + "\n= égal\n"
    msg.add_attachment(text, subtype="csv", filename="qp.csv", cte="quoted-printable")
    msg.add_attachment(text, subtype="csv", filename="8bit.csv", cte="8bit")
    msg.add_attachment(b"\x00\x01\xff" * 10, "application", "octet-stream", cte="binary")
    raw = _smtp_bytes(msg)
    assert b"Content-Transfer-Encoding: binary" in raw
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    expected = [len(p.get_payload(decode=True)) for p in parsed.iter_attachments()]
    summary = _summarize(tmp_path, raw)
    assert [a.size for a in summary.attachments] == expected
    assert [a.filename for a in summary.attachments] == ["qp.csv", "8bit.csv", None]
    _no_defects(summary)


def test_lf_line_endings_are_tolerated(tmp_path: Path) -> None:
    msg = _basic_message("Résultats")
    pdf = _pdf(10_001)
    msg.add_attachment(pdf, maintype="application", subtype="pdf", filename="r.pdf")
    msg.add_attachment("a\nb\n", subtype="csv", filename="c.csv", cte="8bit")
    raw = msg.as_bytes()  # default policy: LF line endings
    assert b"\r\n" not in raw
    summary = _summarize(tmp_path, raw)
    assert summary.subject == "Résultats"
    assert summary.attachments == [
        AttachmentInfo(0, "r.pdf", "application/pdf", len(pdf)),
        AttachmentInfo(1, "c.csv", "text/csv", 4),
    ]
    _no_defects(summary)


def test_non_text_single_part_message_is_an_attachment(tmp_path: Path) -> None:
    pdf = _pdf(777)
    msg = EmailMessage()
    msg["From"] = "a@b.fr"
    msg.set_content(pdf, maintype="application", subtype="pdf")
    summary = _summarize(tmp_path, msg)
    assert summary.attachments == [AttachmentInfo(0, None, "application/pdf", len(pdf))]
    _no_defects(summary)


def test_multipart_digest_default_type(tmp_path: Path) -> None:
    raw = _crlf(
        "From: a@b.fr\n"
        "Content-Type: multipart/digest; boundary=d\n"
        "\n"
        "--d\n"
        "\n"
        "From: x@y.fr\n"
        "Subject: un\n"
        "\n"
        "corps\n"
        "--d--\n"
    )
    summary = _summarize(tmp_path, raw)
    assert summary.attachments == [
        AttachmentInfo(0, None, "message/rfc822", len(b"From: x@y.fr\r\nSubject: un\r\n\r\ncorps"))
    ]
    _no_defects(summary)


def test_boundary_lookalikes_and_whitespace(tmp_path: Path) -> None:
    raw = _crlf(
        "From: a@b.fr\n"
        'Content-Type: multipart/mixed; boundary="==b=="\n'
        "\n"
        "preamble\n"
        "--==b==  \n"
        "Content-Type: application/octet-stream\n"
        "\n"
        "--==b==x not a delimiter\n"
        "-- signature\n"
        "--==b==--\t\n"
        "epilogue --==b==\n"
        "--==b==\n"
    )
    summary = _summarize(tmp_path, raw)
    body = b"--==b==x not a delimiter\r\n-- signature"
    assert summary.attachments == [AttachmentInfo(0, None, "application/octet-stream", len(body))]
    _no_defects(summary)


# --------------------------------------------------------------------------- broken input


_BROKEN_PREFIX = (
    "From: a@b.fr\n"
    "Subject: cassé\n"
    "Content-Type: multipart/mixed; boundary=b1\n"
    "\n"
    "--b1\n"
    "Content-Type: text/plain\n"
    "\n"
    "texte\n"
    "--b1\n"
    "Content-Type: application/pdf; name=a.pdf\n"
    "Content-Transfer-Encoding: base64\n"
    "\n"
    "JVBERi0x\n"
    "--b1\n"
    "Content-Type: image/png; name=b.png\n"
    "\n"
    "PNG\n"
)


def test_missing_closing_boundary(tmp_path: Path) -> None:
    summary = _summarize(tmp_path, _crlf(_BROKEN_PREFIX))
    assert summary.subject == "cassé"
    assert summary.attachments == [
        AttachmentInfo(0, "a.pdf", "application/pdf", 6),
        AttachmentInfo(1, "b.png", "image/png", 5),  # up to EOF: the last CRLF counts
    ]
    assert summary.broken is True
    assert summary.defects == ["message: multipart/mixed without closing boundary"]


def test_truncated_inside_base64_part(tmp_path: Path) -> None:
    raw = _crlf(_BROKEN_PREFIX.split("--b1\nContent-Type: image/png")[0])
    assert raw.endswith(b"JVBERi0x\r\n")
    summary = _summarize(tmp_path, raw[:-6])  # ends with "JVBE": a whole quantum
    assert summary.attachments == [AttachmentInfo(0, "a.pdf", "application/pdf", 3)]
    assert summary.broken is True
    assert summary.defects == ["message: multipart/mixed without closing boundary"]

    summary = _summarize(tmp_path, raw[:-5])  # ends with "JVBER"
    assert summary.attachments == [AttachmentInfo(0, "a.pdf", "application/pdf", 3)]
    assert summary.defects == [
        "part 2: truncated base64 data",
        "message: multipart/mixed without closing boundary",
    ]


def test_inner_multipart_closed_by_outer_boundary(tmp_path: Path) -> None:
    raw = _crlf(
        "From: a@b.fr\n"
        "Content-Type: multipart/mixed; boundary=outer\n"
        "\n"
        "--outer\n"
        "Content-Type: multipart/alternative; boundary=inner\n"
        "\n"
        "--inner\n"
        "Content-Type: text/plain\n"
        "\n"
        "texte\n"
        "--outer\n"
        "Content-Type: application/pdf\n"
        "\n"
        "%PDF\n"
        "--outer--\n"
    )
    summary = _summarize(tmp_path, raw)
    assert summary.attachments == [AttachmentInfo(0, None, "application/pdf", 4)]
    assert summary.broken is True
    assert summary.defects == ["part 1: multipart/alternative without closing boundary"]


def test_multipart_without_boundary_parameter(tmp_path: Path) -> None:
    raw = _crlf(
        "From: a@b.fr\n"
        "Subject: sans boundary\n"
        "Content-Type: multipart/mixed\n"
        "\n"
        "--b1\n"
        "Content-Type: application/pdf\n"
        "\n"
        "%PDF\n"
        "--b1--\n"
    )
    summary = _summarize(tmp_path, raw)
    assert summary.subject == "sans boundary"
    assert summary.attachments == []
    assert summary.broken is True
    assert summary.defects == ["message: multipart/mixed without boundary parameter"]


def test_multipart_body_without_delimiter(tmp_path: Path) -> None:
    raw = _crlf("From: a@b.fr\nContent-Type: multipart/mixed; boundary=zz\n\njust text\n")
    summary = _summarize(tmp_path, raw)
    assert summary.attachments == []
    assert summary.broken is True
    assert summary.defects == ["message: multipart/mixed body without any boundary delimiter"]


@pytest.mark.parametrize(
    ("body", "size", "defect"),
    [
        ("QUJD\nQU@JD\n", 6, "invalid characters in base64 data"),
        ("QUJDRA\n", 4, "missing base64 padding"),
        ("QUJDRA==QUJD\n", 7, "base64 data after the padding"),
        ("QUJDR\n", 3, "truncated base64 data"),
        ("QUJD=\n", 3, "misplaced base64 padding"),
        ("QUJDRA=\n", 4, "incomplete base64 padding"),
        ("QUJDRA===\n", 4, "too much base64 padding"),
        ("QUJDRA=\nQUJD\n", 7, "incomplete base64 padding"),
    ],
)
def test_invalid_base64(tmp_path: Path, body: str, size: int, defect: str) -> None:
    raw = _crlf(
        "From: a@b.fr\n"
        "Content-Type: multipart/mixed; boundary=b1\n"
        "\n"
        "--b1\n"
        "Content-Type: application/pdf; name=x.pdf\n"
        "Content-Transfer-Encoding: base64\n"
        "\n"
        f"{body}"
        "--b1--\n"
    )
    summary = _summarize(tmp_path, raw)
    assert summary.attachments == [AttachmentInfo(0, "x.pdf", "application/pdf", size)]
    assert summary.broken is True
    assert summary.defects == [f"part 1: {defect}"]


def test_base64_garbage_stays_fast_and_bounded(tmp_path: Path) -> None:
    body = ("A=" * 38 + "\n") * 20_000 + "QUJD\n" + "@#!\n" * 1000
    raw = _crlf(
        "From: a@b.fr\nContent-Type: application/pdf\nContent-Transfer-Encoding: base64\n\n" + body
    )
    summary = _summarize(tmp_path, raw)
    assert len(summary.attachments) == 1
    assert summary.attachments[0].size > 0
    assert summary.broken is True
    assert len(summary.defects) <= mime.MAX_DEFECTS + 1


def test_empty_file(tmp_path: Path) -> None:
    summary = _summarize(tmp_path, b"")
    assert summary == MessageSummary(
        from_address=None,
        from_name=None,
        to=None,
        cc=None,
        subject=None,
        date=None,
        message_id=None,
        in_reply_to=[],
        references=[],
        reply_to=None,
        mss_headers={},
        disposition_notification_to=None,
        attachments=[],
        defects=["message: empty message"],
        broken=True,
    )


@pytest.mark.parametrize("ending", ["", "\n", "\n\n"])
def test_header_only_message(tmp_path: Path, ending: str) -> None:
    raw = _crlf("From: a@b.fr\nSubject: en-tête seul\nX-MSS-MES: FIN" + ending)
    summary = _summarize(tmp_path, raw)
    assert summary.from_address == "a@b.fr"
    assert summary.subject == "en-tête seul"
    assert summary.mss_headers == {"X-MSS-MES": "FIN"}
    assert summary.attachments == []
    _no_defects(summary)


def test_garbage_bytes(tmp_path: Path) -> None:
    raw = random.Random(7).randbytes(200_000)
    summary = _summarize(tmp_path, raw)
    assert summary.broken is True
    assert summary.defects


def test_body_without_blank_line_after_headers(tmp_path: Path) -> None:
    summary = _summarize(tmp_path, _crlf("From: a@b.fr\nSubject: s\nthis is the body\n"))
    assert summary.subject == "s"
    assert summary.broken is True
    assert summary.defects == ["message: malformed header line (no blank line before the body?)"]


def test_part_header_block_ended_by_boundary(tmp_path: Path) -> None:
    raw = _crlf(
        "From: a@b.fr\n"
        "Content-Type: multipart/mixed; boundary=b1\n"
        "\n"
        "--b1\n"
        "Content-Type: application/pdf; name=empty.pdf\n"
        "--b1\n"
        "\n"
        "plain text part without headers\n"
        "--b1--\n"
    )
    summary = _summarize(tmp_path, raw)
    assert summary.attachments == [AttachmentInfo(0, "empty.pdf", "application/pdf", 0)]
    _no_defects(summary)


def test_invalid_content_type(tmp_path: Path) -> None:
    raw = _crlf("From: a@b.fr\nContent-Type: multipart/mixed boundary=x\n\n--x\n\nhi\n--x--\n")
    summary = _summarize(tmp_path, raw)
    assert summary.attachments == []
    assert summary.broken is True
    assert summary.defects == [
        "message: invalid Content-Type 'multipart/mixed boundary=x'; read as text/plain"
    ]


def test_nesting_depth_limit(tmp_path: Path) -> None:
    depth = mime.MAX_DEPTH + 5
    lines = ["From: a@b.fr"]
    for level in range(depth):
        lines += [f'Content-Type: multipart/mixed; boundary="l{level}"', "", f"--l{level}"]
    lines += ["Content-Type: application/pdf", "", "%PDF"]
    lines += [f"--l{level}--" for level in reversed(range(depth))]
    summary = _summarize(tmp_path, _crlf("\n".join(lines) + "\n"))
    assert summary.broken is True
    assert summary.attachments == []
    path = ".".join(["1"] * mime.MAX_DEPTH)
    assert summary.defects == [
        f"part {path}: multipart nesting deeper than {mime.MAX_DEPTH} levels; not followed"
    ]


def test_nesting_within_limit(tmp_path: Path) -> None:
    depth = mime.MAX_DEPTH
    lines = ["From: a@b.fr"]
    for level in range(depth):
        lines += [f'Content-Type: multipart/mixed; boundary="l{level}"', "", f"--l{level}"]
    lines += ["Content-Type: application/pdf", "", "%PDF"]
    lines += [f"--l{level}--" for level in reversed(range(depth))]
    summary = _summarize(tmp_path, _crlf("\n".join(lines) + "\n"))
    assert summary.attachments == [AttachmentInfo(0, None, "application/pdf", 4)]
    _no_defects(summary)


def test_header_block_too_large(tmp_path: Path) -> None:
    filler = "".join(f"X-Filler-{i}: {'x' * 100}\n" for i in range(11_000))
    raw = _crlf("From: a@b.fr\nSubject: gros\n" + filler + "\nbody\n")
    assert len(raw) > mime.MAX_HEADER_BYTES
    summary = _summarize(tmp_path, raw)
    assert summary.from_address == "a@b.fr"
    assert summary.subject == "gros"
    assert summary.broken is True
    assert summary.defects == [f"message: header block larger than {mime.MAX_HEADER_BYTES} octets"]


def test_very_long_lines(tmp_path: Path) -> None:
    pdf = _pdf(300_000)
    one_line = base64.b64encode(pdf).decode()  # a single 400 KB line
    raw = _crlf(
        "From: a@b.fr\n"
        f"Subject: {'long ' * 30_000}\n"
        "Content-Type: multipart/mixed; boundary=b1\n"
        "\n"
        "--b1\n"
        "Content-Type: application/pdf\n"
        "Content-Transfer-Encoding: base64\n"
        "\n"
        f"{one_line}\n"
        "--b1\n"
        "Content-Type: text/csv; name=x.csv\n"
        "\n"
        f"{'y' * 200_000}--b1\n"
        "--b1--\n"
    )
    summary = _summarize(tmp_path, raw)
    assert summary.subject is not None
    assert summary.subject.startswith("long long")
    assert summary.attachments == [
        AttachmentInfo(0, None, "application/pdf", len(pdf)),
        AttachmentInfo(1, "x.csv", "text/csv", 200_000 + 4),
    ]
    _no_defects(summary)


def test_internal_error_becomes_defect(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(self: object, line: bytes) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(mime._Base64Counter, "feed", explode)
    summary = _summarize(tmp_path, _crlf(_BROKEN_PREFIX))
    assert summary.subject == "cassé"
    assert summary.attachments == []
    assert summary.broken is True
    assert summary.defects == ["part 2: internal error while parsing (RuntimeError: boom)"]


def test_open_error_propagates(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        summarize(tmp_path / "missing.eml")


# --------------------------------------------------------------------------- memory


def test_memory_bounded_for_20mb_attachment(tmp_path: Path) -> None:
    size = 20 * 1024 * 1024 + 1
    path = tmp_path / "big.eml"
    rng = random.Random(20)
    with path.open("wb") as out:
        out.write(
            _crlf(
                "From: a@b.fr\n"
                "Subject: gros fichier\n"
                "Content-Type: multipart/mixed; boundary=b1\n"
                "\n"
                "--b1\n"
                "Content-Type: text/plain\n"
                "\n"
                "voir PJ\n"
                "--b1\n"
                'Content-Type: application/pdf; name="imagerie.pdf"\n'
                "Content-Transfer-Encoding: base64\n"
                "\n"
            )
        )
        remaining = size
        while remaining:
            chunk = rng.randbytes(min(remaining, 57 * 1024))  # whole 76-char lines
            out.write(base64.encodebytes(chunk).replace(b"\n", b"\r\n"))
            remaining -= len(chunk)
        out.write(b"--b1--\r\n")
    assert path.stat().st_size > 27_000_000

    tracemalloc.start()
    try:
        summary = summarize(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert summary.attachments == [AttachmentInfo(0, "imagerie.pdf", "application/pdf", size)]
    _no_defects(summary)
    assert peak < 5 * 1024 * 1024, peak


# --------------------------------------------------------------------------- properties


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_random_bytes_never_raise(data: bytes) -> None:
    summary = summarize_bytes(data)
    assert isinstance(summary, MessageSummary)
    assert len(summary.defects) <= mime.MAX_DEFECTS + 1
    for position, attachment in enumerate(summary.attachments):
        assert attachment.position == position
        assert attachment.size >= 0


_LINES = st.sampled_from(
    [
        b"From: a@b.fr",
        b"From: =?utf-8?q?Andr=C3=A9?= <a@b",
        b"Subject: =?utf-8?b?w6k?=",
        b"Content-Type: multipart/mixed; boundary=b1",
        b"Content-Type: multipart/alternative; boundary=b2",
        b'Content-Type: multipart/related; boundary="b1"',
        b"Content-Type: multipart/digest; boundary=b3",
        b"Content-Type: message/rfc822",
        b"Content-Type: application/pdf; name*=utf-8''%C3%A9.pdf",
        b'Content-Disposition: attachment; filename="=?utf-8?q?=C3=A9?="',
        b"Content-Disposition: attachment; filename*0*=x''a; filename*1=b",
        b"Content-Transfer-Encoding: base64",
        b"Content-Transfer-Encoding: quoted-printable",
        b"--b1",
        b"--b1--",
        b"--b2",
        b"--b2--",
        b"--b3",
        b"--b3--",
        b"",
        b" folded",
        b"QUJD",
        b"QUJDRA==",
        b"QQ=",
        b"=41=\xff=",
        b"\xff\xfe\x00",
        b"no header here",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_LINES, max_size=60), st.sampled_from([b"\r\n", b"\n"]), st.booleans())
def test_structured_garbage_never_raises(lines: list[bytes], eol: bytes, final: bool) -> None:
    data = eol.join(lines) + (eol if final else b"")
    summary = summarize_bytes(data)
    assert isinstance(summary, MessageSummary)
    for position, attachment in enumerate(summary.attachments):
        assert attachment.position == position
        assert attachment.size >= 0


_ATTACHMENT = st.tuples(
    st.binary(max_size=3000),
    st.sampled_from(["base64", "quoted-printable", "8bit"]),
    st.booleans(),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(_ATTACHMENT, max_size=4),
    st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=40),
)
def test_sizes_match_stdlib_decoding(
    tmp_path: Path, attachments: list[tuple[bytes, str, bool]], subject: str
) -> None:
    msg = _basic_message(" ".join(subject.split()))
    for index, (content, cte, named) in enumerate(attachments):
        filename = f"pièce {index}.bin" if named else None
        if cte == "base64":
            msg.add_attachment(content, "application", "octet-stream", filename=filename)
        else:
            text = content.decode("latin-1").replace("\r", "").replace("\x00", "")
            text = "\n".join(text[i : i + 70] for i in range(0, len(text), 70))
            msg.add_attachment(text, subtype="csv", filename=filename, cte=cte)
    raw = _smtp_bytes(msg)
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    expected = [
        (p.get_filename(), p.get_content_type(), len(p.get_payload(decode=True)))
        for p in parsed.iter_attachments()
    ]
    summary = summarize(_write(tmp_path, raw))
    assert [(a.filename, a.content_type, a.size) for a in summary.attachments] == expected
    assert summary.subject == parsed["Subject"]
    _no_defects(summary)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000), st.data())
def test_base64_counter_chunking(data: bytes, draw: st.DataObject) -> None:
    encoded = base64.encodebytes(data).replace(b"\n", b"\r\n")
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(encoded)), max_size=10)))
    pieces = [encoded[a:b] for a, b in zip([0, *cuts], [*cuts, len(encoded)], strict=True)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mime, "_FLUSH", draw.draw(st.integers(1, 64)))
        counter = mime._Base64Counter()
        for piece in pieces:
            counter.feed(piece)
        assert counter.finish(True) == len(data)
        assert counter.problems == []


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000), st.data())
def test_quoted_printable_counter_chunking(data: bytes, draw: st.DataObject) -> None:
    encoded = binascii.b2a_qp(data).replace(b"\n", b"\r\n") + b"\r\n"
    lines = encoded.splitlines(keepends=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mime, "_FLUSH", draw.draw(st.integers(1, 64)))
        counter = mime._QuotedPrintableCounter()
        for line in lines:
            counter.feed(line)
        # the final CRLF belongs to the delimiter that follows
        assert counter.finish(True) == len(binascii.a2b_qp(encoded[:-2]))
