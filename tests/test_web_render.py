"""Tests for mssante.web.render: what the webmail shows of a stored message, made safe."""

from __future__ import annotations

import base64
import email.policy
import html
import re
import unicodedata
import urllib.parse
from email.message import EmailMessage
from html.parser import HTMLParser
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mssante.store.mime import summarize_bytes
from mssante.web import render
from mssante.web.render import (
    MAX_FILENAME,
    MAX_MIME_PARAMETERS,
    NO_SUBJECT,
    AttachmentInfo,
    DisplayMessage,
    attachment,
    content_disposition,
    display_subject,
    parse,
    sanitize_html,
)

PAYLOADS_FILE = Path(__file__).parent / "data" / "xss_payloads.txt"


def _payload_lines() -> list[str]:
    return [
        line
        for line in PAYLOADS_FILE.read_text(encoding="utf-8").splitlines()
        if not line.startswith("#")
    ]


PAYLOADS = _payload_lines()

# --------------------------------------------------------------------------- checks

ALLOWED_TAGS = {
    *("p", "br", "div", "span", "b", "strong", "i", "em", "u", "s", "sub", "sup", "small"),
    *("ul", "ol", "li", "dl", "dt", "dd"),
    *("table", "thead", "tbody", "tfoot", "tr", "td", "th", "caption"),
    *("h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre", "code", "hr", "a"),
}
ALLOWED_ATTRIBUTES = {
    "a": {"href", "target", "rel"},
    "td": {"colspan", "rowspan"},
    "th": {"colspan", "rowspan"},
}
FORBIDDEN_TAGS = (
    *("script", "iframe", "object", "embed", "svg", "math", "form", "img", "style", "link"),
    *("meta", "base", "input", "button", "textarea", "select", "frame", "template", "noscript"),
)
LINK_REL = "noopener noreferrer nofollow"
SERVED_TYPES = {
    "application/pdf",
    "image/png",
    "image/jpeg",
    "image/tiff",
    "text/plain; charset=utf-8",
    "application/rtf",
    "application/msword",
    "application/octet-stream",
}


class _Markup(HTMLParser):
    """Every tag, attribute and comment of sanitised output, as a browser tokenizes them."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.oddities: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))

    def handle_comment(self, data: str) -> None:
        self.oddities.append(f"comment {data!r}")

    def handle_decl(self, decl: str) -> None:
        self.oddities.append(f"declaration {decl!r}")

    def handle_pi(self, data: str) -> None:
        self.oddities.append(f"processing instruction {data!r}")

    def unknown_decl(self, data: str) -> None:
        self.oddities.append(f"declaration {data!r}")


def assert_safe_html(output: str) -> None:
    """``output`` is fit for ``|safe``: checked structurally, then as text."""
    markup = _Markup(output)
    assert markup.oddities == []
    for tag, attrs in markup.tags:
        assert tag in ALLOWED_TAGS, f"tag <{tag}> in {output!r}"
        names = [name for name, _ in attrs]
        assert len(names) == len(set(names)), output
        for name, value in attrs:
            assert not name.startswith("on"), f"event handler {name} in {output!r}"
            assert name in ALLOWED_ATTRIBUTES.get(tag, set()), f"{tag} {name} in {output!r}"
            if name == "href":
                # What a browser would see: entities decoded, controls and spaces ignored.
                url = re.sub(r"[\x00-\x20\x7f]", "", value or "").lower()
                assert url.startswith(("http:", "https:", "mailto:")), f"href {value!r}"
        if tag == "a":
            assert dict(attrs)["rel"] == LINK_REL
            assert dict(attrs)["target"] == "_blank"
    lowered = output.lower()
    for forbidden in FORBIDDEN_TAGS:
        assert f"<{forbidden}" not in lowered, output
    # Text is escaped (no "<" outside tags), so these are the tags themselves.
    for tag_text in re.findall(r"<[^>]*>", lowered):
        assert not re.search(r"[\s/\"']on[a-z]+\s*=", tag_text), tag_text
        for needle in ("style=", "srcdoc", "javascript:", "vbscript:", "data:", "class=", "id="):
            assert needle not in tag_text, tag_text


def assert_safe_filename(name: str) -> None:
    assert name
    assert len(name) <= MAX_FILENAME
    assert not any(char in name for char in '/\\"<>')
    assert not name.startswith(".")
    assert name == name.strip()
    assert all(unicodedata.category(char) not in {"Cc", "Cf", "Zl", "Zp"} for char in name)


DISPOSITION_RE = re.compile(
    r"attachment; filename=\"([ -!#-\[\]-~]+)\"; filename\*=UTF-8''([A-Za-z0-9!#$&+\-.^_`|~%]+)"
)


def assert_safe_disposition(value: str) -> str:
    """One header value, printable ASCII; returns the UTF-8 file name it carries."""
    assert value.isascii() and value.isprintable(), repr(value)
    match = DISPOSITION_RE.fullmatch(value)
    assert match is not None, value
    fallback, encoded = match.groups()
    name = urllib.parse.unquote(encoded, errors="strict")
    assert_safe_filename(fallback)
    assert_safe_filename(name)
    return name


# --------------------------------------------------------------------------- messages

PDF = b"%PDF-1.7\n" + bytes(range(256)) * 8 + b"\n%%EOF\n"
ZIP = b"PK\x03\x04" + bytes(range(200)) * 3
PNG = b"\x89PNG\r\n\x1a\n" + bytes(100)
TEXT = (
    "Bonjour Madame,\n"
    "\n"
    "veuillez trouver ci-joint votre compte rendu d'hospitalisation.\n"
    "Un texte qui ressemble à du code reste du texte : <script>alert(1)</script> & a < b.\n"
    "\n"
    "Dr Jeanne Martin\n"
)
HTML_BODY = (
    "<html><head><title>Compte rendu</title><style>p{color:red}</style></head>"
    "<body><p>Bonjour Madame,</p><p>Votre <b>compte rendu</b> est joint. "
    '<a href="https://chu-exemple.fr/rdv">Prendre rendez-vous</a></p></body></html>'
)


def _smtp(msg: EmailMessage) -> bytes:
    """The message as it travels over SMTP (CRLF line endings)."""
    return msg.as_bytes(policy=email.policy.SMTP)


def _crlf(text: str, charset: str = "utf-8") -> bytes:
    """Hand-written message text with LF line endings -> CRLF bytes."""
    return text.replace("\n", "\r\n").encode(charset)


def _headers(msg: EmailMessage, subject: str = "XDM/1.0/DDM+Compte rendu MARTIN Camille") -> None:
    msg["From"] = "Dr Jeanne Martin <jeanne.martin@chu-exemple.mssante.fr>"
    msg["To"] = "1234567890123@patient.mssante.fr"
    msg["Subject"] = subject
    msg["Date"] = "Tue, 04 Jun 2024 10:15:00 +0200"
    msg["Message-ID"] = "<cr-42@chu-exemple.mssante.fr>"


def _letter() -> EmailMessage:
    """A document mail as professional software sends it (DOMAIN.md 5)."""
    msg = EmailMessage()
    _headers(msg)
    msg.set_content(TEXT)
    msg.add_alternative(HTML_BODY, subtype="html")
    msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="compte-rendu-été.pdf")
    msg.add_attachment(ZIP, maintype="application", subtype="zip", filename="IHE_XDM.zip")
    return msg


def _plain(text: str = TEXT) -> EmailMessage:
    msg = EmailMessage()
    _headers(msg, "Résultats")
    msg.set_content(text)
    return msg


def _with_attachment(data: bytes, content_type: str, filename: str = "fichier") -> EmailMessage:
    msg = _plain("Ci-joint.\n")
    maintype, subtype = content_type.split("/")
    msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg


def _related() -> EmailMessage:
    """alternative(plain, related(html, inline png)): an HTML mail with a logo."""
    msg = EmailMessage()
    _headers(msg, "Convocation")
    msg.set_content("Convocation le 12 juin.\n")
    msg.add_alternative(
        '<p>Convocation le <b>12 juin</b>.</p><img src="cid:logo@chu">', subtype="html"
    )
    html_part = msg.get_payload()[1]
    html_part.add_related(PNG, maintype="image", subtype="png", cid="<logo@chu>")
    return msg


def _forward() -> EmailMessage:
    """A message carrying another message, which carries a PDF."""
    inner = _letter()
    del inner["Subject"]
    inner["Subject"] = "Message transféré"
    msg = _plain("Voir le message joint.\n")
    msg.add_attachment(inner)
    msg.add_attachment(PNG, maintype="image", subtype="png", filename="photo.png")
    return msg


BROKEN_NO_CLOSE = _crlf(
    "From: a@chu-exemple.mssante.fr\n"
    "Subject: sans fin\n"
    "Content-Type: multipart/mixed; boundary=frontiere\n"
    "\n"
    "--frontiere\n"
    "Content-Type: text/plain; charset=iso-8859-1\n"
    "Content-Transfer-Encoding: quoted-printable\n"
    "\n"
    "R=E9sultat normal.\n"
    "--frontiere\n"
    'Content-Type: application/pdf; name="bilan.pdf"\n'
    "Content-Transfer-Encoding: base64\n"
    "\n"
    "JVBERi0xLjcKJSVFT0YK\n"
)


def _samples() -> list[bytes]:
    return [
        _smtp(_letter()),
        _smtp(_plain()),
        _smtp(_related()),
        _smtp(_forward()),
        BROKEN_NO_CLOSE,
    ]


SAMPLES = _samples()

# --------------------------------------------------------------------------- the corpus


def test_payload_corpus_is_large_and_well_formed() -> None:
    raw_lines = PAYLOADS_FILE.read_text(encoding="utf-8").splitlines()
    assert all(line.strip() for line in raw_lines), "blank line in the corpus"
    assert len(PAYLOADS) >= 60
    assert len(set(PAYLOADS)) == len(PAYLOADS)
    for payload in PAYLOADS:
        # Encoded forms (&#97;lert, \u0061lert, base64) decode to a call of alert.
        decoded = html.unescape(payload).replace("\\u0061", "a")
        for blob in re.findall(r"base64,([A-Za-z0-9+/=]+)", payload):
            decoded += base64.b64decode(blob).decode()
        assert "alert" in decoded, payload
        assert "\r" not in payload and "\x00" not in payload
    families = {
        "<script": "script tag",
        "onerror": "event handler",
        "ontoggle": "details",
        "onanimationstart": "animation",
        "autofocus": "focus",
        "javascript:": "javascript URL",
        "vbscript:": "vbscript URL",
        "data:text/html": "data URL",
        "formaction": "form action",
        "xlink:href": "xlink",
        "srcdoc": "iframe srcdoc",
        "http-equiv": "meta refresh",
        "<base": "base",
        "<object": "object",
        "<embed": "embed",
        "expression(": "CSS expression",
        "<svg": "svg",
        "<math": "math",
        "<noscript": "noscript",
        "</title>": "title breakout",
        '"onmouseover="': "attribute breakout",
        "&#x09;": "entity-split scheme",
        "\u202e": "bidi override",
    }
    for needle, family in families.items():
        assert any(needle in payload for payload in PAYLOADS), family


@pytest.mark.parametrize("payload", PAYLOADS)
def test_sanitized_payload_is_inert(payload: str) -> None:
    assert_safe_html(sanitize_html(payload))
    assert_safe_html(sanitize_html(f"<p>{payload}</p>"))
    assert_safe_html(sanitize_html(f'<a href="https://exemple.fr/">{payload}</a>'))
    document = f"<html><head><title>{payload}</title></head><body>{payload}</body></html>"
    assert_safe_html(sanitize_html(document))


@pytest.mark.parametrize("payload", PAYLOADS)
def test_payload_in_an_html_body_is_inert(payload: str) -> None:
    msg = _plain("Version texte.\n")
    msg.add_alternative(f"<p>Bonjour</p>{payload}<p>Au revoir</p>", subtype="html")
    shown = parse(_smtp(msg))
    assert shown.html is not None and shown.text is None
    assert_safe_html(shown.html)
    assert "Bonjour" in shown.html


@pytest.mark.parametrize("payload", PAYLOADS)
def test_payload_as_a_file_name(payload: str) -> None:
    raw = _smtp(_with_attachment(PDF, "application/pdf", filename=payload))
    [item] = parse(raw).attachments
    assert_safe_filename(item.filename)
    served = attachment(raw, 0)
    assert served is not None and served.filename == item.filename
    assert_safe_disposition(content_disposition(item.filename))
    assert_safe_disposition(content_disposition(payload))


@pytest.mark.parametrize("payload", PAYLOADS)
def test_payload_as_a_subject(payload: str) -> None:
    for subject in (payload, f"XDM/1.0/DDM+{payload}", f"{payload}\r\n\t{payload}"):
        shown = display_subject(subject)
        assert shown and shown == shown.strip()
        assert all(unicodedata.category(char) not in {"Cc", "Cf"} for char in shown)
        assert not shown.startswith("XDM/1.0/DDM+")


# --------------------------------------------------------------------------- the sanitiser


def test_sanitizer_keeps_text_and_structure() -> None:
    source = (
        "<h1>Titre</h1><h6>Petit titre</h6><p>Un <b>gras</b>, <strong>fort</strong>, "
        "<i>italique</i>, <em>accent</em>, <u>souligné</u>, <s>barré</s>, H<sub>2</sub>O, "
        "m<sup>2</sup>, <small>petit</small>, <span>portée</span><br></p><hr>"
        "<ul><li>un</li></ul><ol><li>deux</li></ol><dl><dt>terme</dt><dd>définition</dd></dl>"
        "<blockquote><div>cité</div></blockquote><pre><code>code</code></pre>"
        '<table><caption>Résultats</caption><thead><tr><th colspan="2">Examen</th></tr></thead>'
        '<tbody><tr><td rowspan="2">Glycémie</td><td>5,2</td></tr></tbody>'
        "<tfoot><tr><td>fin</td></tr></tfoot></table>"
    )
    cleaned = sanitize_html(source)
    assert {tag for tag, _ in _Markup(cleaned).tags} == {tag for tag, _ in _Markup(source).tags}
    assert '<th colspan="2">' in cleaned and '<td rowspan="2">' in cleaned
    for word in ("Titre", "gras", "souligné", "définition", "Glycémie", "fin"):
        assert word in cleaned
    assert_safe_html(cleaned)


def test_links_open_in_a_new_tab_without_opener_or_referrer() -> None:
    cleaned = sanitize_html(
        '<a href="https://chu-exemple.fr/rdv" target="_self" rel="opener">rdv</a>'
        '<a href="http://exemple.fr/">http</a>'
        '<a href="mailto:secretariat@chu-exemple.mssante.fr">écrire</a>'
    )
    links = [dict(attrs) for tag, attrs in _Markup(cleaned).tags if tag == "a"]
    assert links == [
        {"href": "https://chu-exemple.fr/rdv", "target": "_blank", "rel": LINK_REL},
        {"href": "http://exemple.fr/", "target": "_blank", "rel": LINK_REL},
        {
            "href": "mailto:secretariat@chu-exemple.mssante.fr",
            "target": "_blank",
            "rel": LINK_REL,
        },
    ]


@pytest.mark.parametrize(
    "href",
    [
        "/deconnexion",  # relative: would point into the webmail itself
        "//autre.exemple/",
        "../compte",
        "ftp://exemple.fr/",
        "file:///etc/passwd",
        "tel:+33100000000",
    ],
)
def test_other_links_lose_their_target(href: str) -> None:
    cleaned = sanitize_html(f'<a href="{href}">lien</a>')
    [(_, attrs)] = _Markup(cleaned).tags
    assert dict(attrs) == {"target": "_blank", "rel": LINK_REL}
    assert "lien" in cleaned


def test_script_and_style_content_disappears() -> None:
    cleaned = sanitize_html(
        "<style>p { display: none }</style><p>Bonjour</p><script>alert(1)</script>"
        "<noscript>sans script</noscript><template><p>modèle</p></template>"
    )
    assert cleaned == "<p>Bonjour</p>"


def test_document_head_disappears() -> None:
    assert sanitize_html(HTML_BODY).startswith("<p>Bonjour Madame,</p>")
    assert "Compte rendu</" not in sanitize_html(HTML_BODY)  # the <title>


def test_comments_are_stripped() -> None:
    assert sanitize_html("<!-- note interne --><p>a</p><!--[if mso]>x<![endif]-->") == "<p>a</p>"


def test_no_generic_attributes() -> None:
    """nh3 keeps title and lang on every tag unless "*" is given an empty set."""
    cleaned = sanitize_html(
        '<p class="c" id="i" style="color:red" title="t" lang="fr" dir="rtl" data-x="1">a</p>'
    )
    assert cleaned == "<p>a</p>"


def test_no_remote_images() -> None:
    assert sanitize_html('<p>x<img src="https://pixel.exemple/t.gif" alt="logo"></p>') == "<p>x</p>"


def test_lone_surrogates_do_not_break_the_sanitizer() -> None:
    assert sanitize_html("<p>a\ud800b</p>") == "<p>a?b</p>"


# --------------------------------------------------------------------------- subjects


@pytest.mark.parametrize(
    ("subject", "shown"),
    [
        (
            "XDM/1.0/DDM+Bilan sanguin MARTIN Camille 20261120",
            "Bilan sanguin MARTIN Camille 20261120",
        ),
        ("  XDM/1.0/DDM+  Bilan", "Bilan"),
        ("xdm/1.0/ddm+Bilan", "Bilan"),
        ("XDM/1.0/DDM+", NO_SUBJECT),
        ("Re: XDM/1.0/DDM+Bilan", "Re: XDM/1.0/DDM+Bilan"),  # only a leading prefix
        ("Résultats\r\n\tde  l'examen", "Résultats de l'examen"),
        ("Bilan\x00\x1b[31m", "Bilan[31m"),
        ("", NO_SUBJECT),
        ("  \r\n ", NO_SUBJECT),
        (None, NO_SUBJECT),
    ],
)
def test_display_subject(subject: str | None, shown: str) -> None:
    assert display_subject(subject) == shown


# --------------------------------------------------------------------------- bodies


def test_plain_text_body_comes_back_unchanged() -> None:
    shown = parse(_smtp(_plain()))
    assert shown == DisplayMessage(html=None, text=TEXT, attachments=[])


def test_alternative_prefers_html() -> None:
    shown = parse(_smtp(_letter()))
    assert shown.text is None and shown.html is not None
    assert shown.html.startswith("<p>Bonjour Madame,</p>")
    assert "Prendre rendez-vous</a>" in shown.html
    assert "<title" not in shown.html and "color:red" not in shown.html
    assert_safe_html(shown.html)


def test_alternative_prefers_html_even_when_it_is_not_last() -> None:
    msg = EmailMessage()
    _headers(msg)
    msg.make_alternative()
    msg.attach(_part("<p>riche</p>", "html"))
    msg.attach(_part("pauvre\n", "plain"))
    assert parse(_smtp(msg)).html == "<p>riche</p>\n"


def _part(text: str, subtype: str) -> EmailMessage:
    part = EmailMessage()
    part.set_content(text, subtype=subtype)
    return part


def test_related_html_body_with_an_inline_image() -> None:
    raw = _smtp(_related())
    shown = parse(raw)
    assert shown.html == "<p>Convocation le <b>12 juin</b>.</p>\n"
    assert shown.attachments == [AttachmentInfo(0, "piece-jointe-1.png", "image/png", len(PNG))]


def test_every_inline_part_of_a_mixed_message_is_shown() -> None:
    """Some mail software splits an HTML body around an attachment."""
    msg = EmailMessage()
    _headers(msg)
    msg.make_mixed()
    msg.attach(_part("<p>avant</p>", "html"))
    pdf = EmailMessage()
    pdf.set_content(PDF, maintype="application", subtype="pdf", filename="a.pdf")
    msg.attach(pdf)
    msg.attach(_part("après\n", "plain"))
    shown = parse(_smtp(msg))
    assert shown.html == "<p>avant</p>\n\n<pre>après\n</pre>"
    assert [item.filename for item in shown.attachments] == ["a.pdf"]


def test_text_parts_that_are_attachments_are_not_the_body() -> None:
    msg = _plain("Le corps.\n")
    msg.add_attachment("<script>alert(1)</script>", subtype="html", filename="page.html")
    msg.add_attachment("notes\n", filename="notes.txt")
    shown = parse(_smtp(msg))
    assert shown.html is None and shown.text == "Le corps.\n"
    assert [(a.filename, a.content_type) for a in shown.attachments] == [
        ("page.html", "text/html"),
        ("notes.txt", "text/plain"),
    ]


@pytest.mark.parametrize(
    ("headers", "body", "text"),
    [
        ("Content-Type: text/plain; charset=iso-8859-1\n", b"d\xe9j\xe0", "déjà"),
        ("Content-Type: text/plain\n", b"d\xe9j\xe0 \x80", "déjà €"),  # undeclared: cp1252
        ("Content-Type: text/plain; charset=us-ascii\n", "déjà".encode(), "déjà"),
        ("Content-Type: text/plain; charset=x-inconnu\n", "déjà".encode(), "déjà"),
        ("Content-Type: text/plain; charset=utf-8\n", b"d\xc3j\x81", "dÃj\ufffd"),
        ("Content-Type: text/plain; charset=rot13\n", b"abc", "abc"),  # not a text codec
        (
            "Content-Type: text/plain; charset=utf-8\n"
            "Content-Transfer-Encoding: quoted-printable\n",
            b"d=C3=A9j=C3=A0 =\nsuite",
            "déjà suite",
        ),
        (
            "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: base64\n",
            b"!!ZMOpasOg",  # stray characters skipped
            "déjà",
        ),
        ("", b"a\r\nb\rc\n", "a\nb\nc\n"),
    ],
)
def test_body_charsets(headers: str, body: bytes, text: str) -> None:
    raw = _crlf(f"From: a@chu-exemple.mssante.fr\nSubject: x\n{headers}\n") + body
    assert parse(raw) == DisplayMessage(None, text, [])


def test_html_with_a_declared_charset() -> None:
    raw = _crlf("Content-Type: text/html; charset=windows-1252\n\n") + b"<p>\x80 \xe9t\xe9</p>"
    assert parse(raw).html == "<p>€ été</p>"


def test_multipart_without_boundary_shows_the_body_as_text() -> None:
    raw = _crlf("Subject: x\nContent-Type: multipart/mixed\n\nLe texte est là.\n")
    assert parse(raw) == DisplayMessage(None, "Le texte est là.\n", [])


def test_multipart_whose_boundary_never_comes_shows_the_body_as_text() -> None:
    raw = _crlf("Content-Type: multipart/mixed; boundary=absente\n\nLe texte est là.\n")
    assert parse(raw) == DisplayMessage(None, "Le texte est là.\n", [])


def test_missing_closing_boundary_keeps_the_parts() -> None:
    shown = parse(BROKEN_NO_CLOSE)
    assert shown.text == "Résultat normal."  # RFC 2046 5.1.1: the CRLF is the delimiter's
    assert shown.attachments == [
        AttachmentInfo(0, "bilan.pdf", "application/pdf", len(b"%PDF-1.7\n%%EOF\n"))
    ]


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"", ""),
        (b"Subject: rien\r\n\r\n", ""),
        (b"\xff\xfe\x00garbage", "ÿþ\x00garbage"),
    ],
)
def test_degenerate_messages(raw: bytes, text: str) -> None:
    assert parse(raw) == DisplayMessage(None, text, [])


# --------------------------------------------------------------------------- attachments


def test_attachments_are_listed_with_decoded_sizes() -> None:
    raw = _smtp(_letter())
    assert parse(raw).attachments == [
        AttachmentInfo(0, "compte-rendu-été.pdf", "application/pdf", len(PDF)),
        AttachmentInfo(1, "IHE_XDM.zip", "application/zip", len(ZIP)),
    ]
    assert len(raw) > len(PDF) + len(ZIP)  # base64 on the wire


def test_a_nested_message_is_one_attachment() -> None:
    raw = _smtp(_forward())
    shown = parse(raw)
    assert shown.text == "Voir le message joint.\n"
    assert [(a.index, a.filename, a.content_type) for a in shown.attachments] == [
        (0, "piece-jointe-1.eml", "message/rfc822"),
        (1, "photo.png", "image/png"),
    ]
    served = attachment(raw, 0)
    assert served is not None and served.content_type == "application/octet-stream"
    assert len(served.data) == shown.attachments[0].size
    inner = email.message_from_bytes(served.data, policy=email.policy.default)
    assert inner["Subject"] == "Message transféré"
    assert parse(served.data).attachments[0].filename == "compte-rendu-été.pdf"


@pytest.mark.parametrize("raw", SAMPLES, ids=["letter", "plain", "related", "forward", "broken"])
def test_numbering_and_sizes_match_the_store(raw: bytes) -> None:
    """URLs carry parse()'s numbers; the store's summary must agree with them."""
    ours = [(a.index, a.content_type, a.size) for a in parse(raw).attachments]
    stored = [(a.position, a.content_type, a.size) for a in summarize_bytes(raw).attachments]
    assert ours == stored


@pytest.mark.parametrize(
    ("content_type", "name"),
    [
        ("application/pdf", "piece-jointe-2.pdf"),
        ("image/jpeg", "piece-jointe-2.jpg"),
        ("application/x-inconnu", "piece-jointe-2"),
    ],
)
def test_unnamed_attachments_get_a_name(content_type: str, name: str) -> None:
    msg = _with_attachment(PDF, "application/pdf", filename="premier.pdf")
    maintype, subtype = content_type.split("/")
    msg.add_attachment(PDF, maintype=maintype, subtype=subtype)
    raw = _smtp(msg)
    assert [a.filename for a in parse(raw).attachments] == ["premier.pdf", name]
    served = attachment(raw, 1)
    assert served is not None and served.filename == name


@pytest.mark.parametrize(
    ("disposition", "name"),
    [
        ('attachment; filename="../../etc/passwd"', "passwd"),
        ('attachment; filename="C:\\\\Users\\\\martin\\\\bilan.pdf"', "bilan.pdf"),
        ('attachment; filename=".htaccess"', "htaccess"),
        ('attachment; filename="facture\u202efdp.exe"', "facturefdp.exe"),
        ('attachment; filename="a\\"b<c>d.pdf"', "ab_c_d.pdf"),
        ("attachment; filename*=UTF-8''compte-rendu-%C3%A9t%C3%A9.pdf", "compte-rendu-été.pdf"),
        (
            'attachment; filename="=?UTF-8?Q?compte-rendu-=C3=A9t=C3=A9.pdf?="',
            "compte-rendu-été.pdf",
        ),
        ("attachment; filename==?UTF-8?B?w6l0w6kucGRm?=", "été.pdf"),
        ('attachment; filename="   "', "piece-jointe-1.pdf"),
    ],
)
def test_declared_file_names_are_cleaned(disposition: str, name: str) -> None:
    raw = _crlf(
        "Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/plain\n\ncorps\n"
        f"--b\nContent-Type: application/pdf\nContent-Disposition: {disposition}\n\n%PDF\n--b--\n"
    )
    [item] = parse(raw).attachments
    assert item.filename == name
    assert_safe_filename(item.filename)


@pytest.mark.parametrize("encoding", ["utf-8", "cp1252"])
def test_raw_8bit_file_names(encoding: str) -> None:
    raw = _crlf(
        "Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/plain\n\ncorps\n"
        '--b\nContent-Type: application/pdf\nContent-Disposition: attachment; filename="été.pdf"'
        "\n\n%PDF\n--b--\n",
        encoding,
    )
    assert [a.filename for a in parse(raw).attachments] == ["été.pdf"]


def test_long_file_names_keep_their_extension() -> None:
    raw = _smtp(_with_attachment(PDF, "application/pdf", filename="é" * 300 + ".pdf"))
    [item] = parse(raw).attachments
    assert len(item.filename) == MAX_FILENAME
    assert item.filename.endswith("é.pdf")


@pytest.mark.parametrize(
    ("content_type", "served"),
    [
        ("application/pdf", "application/pdf"),
        ("image/png", "image/png"),
        ("image/jpeg", "image/jpeg"),
        ("image/jpg", "image/jpeg"),
        ("image/tiff", "image/tiff"),
        ("application/rtf", "application/rtf"),
        ("application/msword", "application/msword"),
        ("text/html", "application/octet-stream"),
        ("image/svg+xml", "application/octet-stream"),
        ("application/xhtml+xml", "application/octet-stream"),
        ("application/javascript", "application/octet-stream"),
        ("text/javascript", "application/octet-stream"),
        ("application/x-inconnu", "application/octet-stream"),
        ("image/gif", "application/octet-stream"),
    ],
)
def test_served_content_types(content_type: str, served: str) -> None:
    data = b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"/>'
    raw = _smtp(_with_attachment(data, content_type))
    item = attachment(raw, 0)
    assert item is not None
    assert (item.content_type, item.data, item.filename) == (served, data, "fichier")


@pytest.mark.parametrize(
    ("data", "served"),
    [
        ("Résultats\n".encode(), "text/plain; charset=utf-8"),
        ("Résultats\n".encode("latin-1"), "application/octet-stream"),
    ],
)
def test_served_text_plain_only_when_it_is_utf8(data: bytes, served: str) -> None:
    raw = _smtp(_with_attachment(data, "text/plain", filename="resultats.txt"))
    item = attachment(raw, 0)
    assert item is not None and (item.content_type, item.data) == (served, data)


def test_attachment_bytes_are_the_decoded_content() -> None:
    raw = _smtp(_letter())
    pdf, zip_ = attachment(raw, 0), attachment(raw, 1)
    assert pdf is not None and (pdf.filename, pdf.content_type, pdf.data) == (
        "compte-rendu-été.pdf",
        "application/pdf",
        PDF,
    )
    assert zip_ is not None and (zip_.content_type, zip_.data) == ("application/octet-stream", ZIP)


@pytest.mark.parametrize("index", [-1, 2, 1000])
def test_attachment_that_does_not_exist(index: int) -> None:
    assert attachment(_smtp(_letter()), index) is None


def test_attachment_of_garbage() -> None:
    assert attachment(b"\x00\xff garbage", 0) is None


# --------------------------------------------------------------------------- Content-Disposition


@pytest.mark.parametrize(
    ("filename", "fallback", "name"),
    [
        ("compte-rendu-été.pdf", "compte-rendu-ete.pdf", "compte-rendu-été.pdf"),
        ("../../etc/passwd", "passwd", "passwd"),
        ("..\\..\\windows\\system.ini", "system.ini", "system.ini"),
        (
            "bilan.pdf\r\nSet-Cookie: session=volée",
            "bilan.pdf Set-Cookie_ session_volee",
            "bilan.pdf Set-Cookie_ session=volée",
        ),
        ('a"b\\c.pdf', "c.pdf", "c.pdf"),
        ('"; filename="evil.html', "_ filename_evil.html", "; filename=evil.html"),
        ("...", "piece-jointe", "piece-jointe"),
        ("", "piece-jointe", "piece-jointe"),
        ("报告.pdf", "piece-jointe.pdf", "报告.pdf"),
        ("100% sûr;.pdf", "100_ sur_.pdf", "100% sûr;.pdf"),
    ],
)
def test_content_disposition(filename: str, fallback: str, name: str | None) -> None:
    value = content_disposition(filename)
    decoded = assert_safe_disposition(value)
    assert value.startswith(f'attachment; filename="{fallback}"; ')
    if name is not None:
        assert decoded == name
    assert value.count("filename=") == 1 and value.count("filename*=") == 1


def test_content_disposition_caps_the_length() -> None:
    decoded = assert_safe_disposition(content_disposition("a" * 1000 + ".pdf"))
    assert len(decoded) == MAX_FILENAME and decoded.endswith("a.pdf")


# --------------------------------------------------------------------------- hostile structure


def test_hostile_mime_parameters_are_read_bounded() -> None:
    """The default policy's parameter parser is quadratic: 16 KB of ";" took 6 s,
    1 MB took minutes.  Parameters past MAX_MIME_PARAMETERS are not read."""
    body = "bonjour".encode("utf-16-le")
    near = "; x=y" * (MAX_MIME_PARAMETERS - 2)
    far = "; x=y" * (MAX_MIME_PARAMETERS + 10)
    head = "Content-Type: text/plain{}; charset=utf-16-le\n\n"
    assert parse(_crlf(head.format(near)) + body).text == "bonjour"
    assert parse(_crlf(head.format(far)) + body).text == "b\x00o\x00n\x00j\x00o\x00u\x00r\x00"
    # Still a message with a body, whatever the length of the field.
    assert parse(_crlf("Content-Type: text/plain" + ";" * 200_000 + "\n\nok")).text == "ok"


def _nested(depth: int, lines: int = 1) -> bytes:
    opening = "".join(
        f"Content-Type: multipart/mixed; boundary=n{level}\n\n--n{level}\n"
        for level in range(depth)
    )
    closing = "".join(f"--n{level}--\n" for level in reversed(range(depth)))
    leaf = "Content-Type: application/pdf\nContent-Disposition: attachment; filename=f.pdf\n\n"
    return _crlf(opening + leaf + "x\n" * lines + closing)


def test_nesting_within_the_limits_is_parsed() -> None:
    shown = parse(_nested(15))
    assert [a.filename for a in shown.attachments] == ["f.pdf"]


@pytest.mark.parametrize(("depth", "lines"), [(render.MAX_NESTING + 1, 1), (20, 300_000)])
def test_deep_nesting_is_shown_as_text(depth: int, lines: int) -> None:
    """The feed parser tests every line against every open boundary: 100 levels
    and 100,000 lines took 5 s.  Such a message is shown as text, not parsed."""
    raw = _nested(depth, lines)
    assert render._too_complex(raw)
    shown = parse(raw)
    assert shown.attachments == [] and shown.html is None
    assert shown.text is not None and shown.text.startswith("--n0\nContent-Type: multipart/mixed")
    assert attachment(raw, 0) is None


def test_many_closed_siblings_are_not_nesting() -> None:
    parts = "".join(
        f"--b\nContent-Type: multipart/mixed; boundary=s{i}\n\n--s{i}\n"
        f"Content-Type: application/pdf\nContent-Disposition: attachment\n\nx\n--s{i}--\n"
        for i in range(200)
    )
    raw = _crlf(f"Content-Type: multipart/mixed; boundary=b\n\n{parts}--b--\n")
    assert not render._too_complex(raw)
    assert len(parse(raw).attachments) == 200


@pytest.mark.parametrize(
    ("parts", "listed"), [(render.MAX_PARTS - 10, True), (render.MAX_PARTS + 10, False)]
)
def test_too_many_parts_are_shown_as_text(parts: int, listed: bool) -> None:
    body = "".join("--b\nContent-Type: image/png\n\nx\n" for _ in range(parts))
    raw = _crlf(f"Content-Type: multipart/mixed; boundary=b\n\n{body}--b--\n")
    shown = parse(raw)
    if listed:
        assert len(shown.attachments) == min(parts, render.MAX_ATTACHMENTS)
    else:
        assert shown.attachments == [] and shown.text is not None


# --------------------------------------------------------------------------- never raises


def _check(raw: bytes) -> None:
    """parse() and attachment() hold their promises on ``raw``."""
    shown = parse(raw)
    assert isinstance(shown, DisplayMessage)
    assert shown.html is None or shown.text is None
    if shown.html is not None:
        assert_safe_html(shown.html)
    if shown.text is not None:
        shown.text.encode("utf-8")  # no lone surrogate: the page can be encoded
    assert [item.index for item in shown.attachments] == list(range(len(shown.attachments)))
    for item in shown.attachments:
        assert_safe_filename(item.filename)
        served = attachment(raw, item.index)
        assert served is not None
        assert (served.filename, len(served.data)) == (item.filename, item.size)
        assert served.content_type in SERVED_TYPES
    assert attachment(raw, len(shown.attachments)) is None


TOKENS = [
    b"\r\n",
    b"\n",
    b"\r\n\r\n",
    b"--",
    b";",
    b'"',
    b"=?utf-8?q?",
    b"?=",
    b"*0*=",
    b"%",
    b"\xff",
    b"\x00",
    b"boundary=",
    b"charset=utf-7",
    b"charset=x",
    b"base64",
    b"quoted-printable",
    b"Content-Type: multipart/mixed; boundary=b\r\n",
    b"Content-Type: message/rfc822\r\n",
    b"Content-Disposition: attachment; filename=",
    b"<script>alert(1)</script>",
]


@st.composite
def mutated_messages(draw: st.DrawFn) -> bytes:
    raw = bytearray(draw(st.sampled_from(SAMPLES)))
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(raw)))
        operation = draw(st.sampled_from(["delete", "insert", "token", "duplicate", "flip"]))
        if operation == "delete":
            del raw[at : at + draw(st.integers(1, 200))]
        elif operation == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif operation == "token":
            raw[at:at] = draw(st.sampled_from(TOKENS))
        elif operation == "duplicate":
            start = draw(st.integers(0, len(raw)))
            raw[at:at] = raw[start : start + draw(st.integers(1, 300))]
        elif at < len(raw):
            raw[at] ^= 1 << draw(st.integers(0, 7))
    return bytes(raw)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_parse_never_raises_on_arbitrary_bytes(raw: bytes) -> None:
    _check(raw)


@settings(max_examples=200, deadline=None)
@given(mutated_messages())
def test_parse_never_raises_on_mutated_messages(raw: bytes) -> None:
    _check(raw)


@pytest.mark.parametrize("raw", SAMPLES, ids=["letter", "plain", "related", "forward", "broken"])
def test_samples_hold_the_promises(raw: bytes) -> None:
    _check(raw)
