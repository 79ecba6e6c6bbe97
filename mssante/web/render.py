"""What the webmail shows of a stored message, made safe.

A stored message is the raw bytes a professional's mail software sent
(RFC 5322, possibly broken MIME).  These pure functions (no I/O, no
database) turn it into what a page may show:

- :func:`parse`: the body (HTML through :func:`sanitize_html`, or plain text
  that the template escapes) and the list of attachments;
- :func:`attachment`: one attachment's bytes and the type to serve it as
  (a short allowlist, everything else ``application/octet-stream``);
- :func:`content_disposition`: a header value that cannot inject anything;
- :func:`display_subject`: the subject without the XDM prefix.

None of them raises, whatever the bytes: a message the ``email`` package
cannot make sense of is shown as the best text available, undecodable octets
replaced.

Attachments are the leaves that :mod:`mssante.store.mime` counts as such
(``Content-Disposition: attachment``, a file name, or a type other than
``text/*``; a nested ``message/rfc822`` is one attachment), numbered in walk
order from 0; URLs carry that number, so it must not change between
:func:`parse` and :func:`attachment`.
"""

from __future__ import annotations

import html
import io
import re
import unicodedata
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email import policy
from email.generator import BytesGenerator
from email.header import decode_header, make_header
from email.message import EmailMessage, Message
from email.parser import BytesParser
from typing import Final, Literal, TypeAlias, TypeVar

import nh3

from mssante.store.mime import MAX_ATTACHMENTS, MAX_DEPTH

__all__ = [
    "NO_SUBJECT",
    "XDM_PREFIX",
    "AttachmentFile",
    "AttachmentInfo",
    "DisplayMessage",
    "attachment",
    "content_disposition",
    "display_subject",
    "parse",
    "sanitize_html",
]

XDM_PREFIX: Final = "XDM/1.0/DDM+"
NO_SUBJECT: Final = "(sans objet)"
MAX_FILENAME: Final = 200
"""Longest file name shown or sent (characters, extension kept)."""
OCTET_STREAM: Final = "application/octet-stream"

_T = TypeVar("_T")

# DOMAIN.md 5: document mails' subjects start with the prefix; receivers hide it.
_XDM_RE: Final = re.compile(r"^\s*" + re.escape(XDM_PREFIX) + r"\s*", re.IGNORECASE)

# DOMAIN.md 4: the patient-side attachment types.  Anything else (text/html,
# image/svg+xml, scripts, unknown types) is served as an opaque download.
_SERVED: Final = {
    "application/pdf": "application/pdf",
    "image/png": "image/png",
    "image/jpeg": "image/jpeg",
    "image/jpg": "image/jpeg",  # not registered, but common
    "image/tiff": "image/tiff",
    "application/rtf": "application/rtf",
    "application/msword": "application/msword",
}
_TEXT_PLAIN_UTF8: Final = "text/plain; charset=utf-8"

_EXTENSIONS: Final = {
    "application/pdf": ".pdf",
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/jpg": ".jpg",
    "image/tiff": ".tif",
    "text/plain": ".txt",
    "application/rtf": ".rtf",
    "application/msword": ".doc",
    "application/zip": ".zip",
    "text/xml": ".xml",
    "application/xml": ".xml",
    "message/rfc822": ".eml",
}

# --------------------------------------------------------------------------- the sanitiser

_TAGS: Final = frozenset(
    {
        *("p", "br", "div", "span", "b", "strong", "i", "em", "u", "s", "sub", "sup", "small"),
        *("ul", "ol", "li", "dl", "dt", "dd"),
        *("table", "thead", "tbody", "tfoot", "tr", "td", "th", "caption"),
        *("h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre", "code", "hr", "a"),
    }
)
# Dropped with their content, not unwrapped into visible text.  The raw-text
# and foreign-content elements are here too: their content is not markup a
# reader wrote, and they are where mutation XSS lives.
_DROP_WITH_CONTENT: Final = frozenset(
    {
        *("script", "style", "title", "head", "template", "noscript", "noembed", "noframes"),
        *("textarea", "xmp", "plaintext", "iframe", "object", "svg", "math", "select"),
    }
)
# No class or id (no clobbering of the page's names or styles), no style, no
# event handler: the only attributes there are.
_ATTRIBUTES: Final = {"a": {"href"}, "td": {"colspan", "rowspan"}, "th": {"colspan", "rowspan"}}

_CLEANER: Final = nh3.Cleaner(
    tags=_TAGS,
    clean_content_tags=_DROP_WITH_CONTENT,
    attributes=_ATTRIBUTES,
    strip_comments=True,
    link_rel="noopener noreferrer nofollow",
    set_tag_attribute_values={"a": {"target": "_blank"}},
    url_schemes={"http", "https", "mailto"},
    # A relative link would point into the webmail itself (/logout, forms).
    url_relative="deny",
)


def sanitize_html(value: str) -> str:
    """Sanitise an HTML fragment or document: safe to insert with ``|safe``.

    An allowlist of text and structure tags; links keep only http, https and
    mailto URLs, and open in a new tab without opener or referrer.  No image
    (no remote content, no tracking), no style, no form, no script.
    """
    return _CLEANER.clean(_unicode(value))


# --------------------------------------------------------------------------- public types


@dataclass(frozen=True, slots=True)
class AttachmentInfo:
    """One attachment as listed on the page."""

    index: int
    """0-based, in walk order: the number that URLs carry (plus one)."""
    filename: str
    """Cleaned for display, never empty (``piece-jointe-N``: N is ``index + 1``)."""
    content_type: str
    """As declared, lower-case ``type/subtype``."""
    size: int
    """Decoded size in octets."""


@dataclass(frozen=True, slots=True)
class DisplayMessage:
    """A message's displayable body and its attachments."""

    html: str | None
    """Sanitised HTML, safe to insert with ``|safe``; None for a text body."""
    text: str | None
    """Plain text, to be escaped by the template; None when ``html`` is set."""
    attachments: list[AttachmentInfo]


@dataclass(frozen=True, slots=True)
class AttachmentFile:
    """An attachment ready to be served."""

    filename: str
    content_type: str
    """The type to serve (allowlist), not necessarily the declared one."""
    data: bytes


# --------------------------------------------------------------------------- public functions


def display_subject(subject: str | None) -> str:
    """The subject as shown: XDM prefix hidden, whitespace collapsed, never empty."""
    text = " ".join(_printable(subject or "").split())
    text = _XDM_RE.sub("", text, count=1)
    return text or NO_SUBJECT


def parse(raw: bytes) -> DisplayMessage:
    """What the webmail shows of ``raw``; never raises."""
    try:
        message = _parse(raw)
        pieces = _body(message, 0)
        attachments = [
            AttachmentInfo(index, _display_filename(part, index), _content_type(part), len(data))
            for index, part in enumerate(_attachment_parts(message))
            for data in (_leaf_bytes(part),)
        ]
        html_body, text_body = _render(pieces)
        if html_body is None and text_body is None and not attachments:
            text_body = _fallback_text(raw)
        return DisplayMessage(html_body, text_body, attachments)
    except Exception:  # never raise: show what the bytes say
        return DisplayMessage(None, _fallback_text(raw), [])


def attachment(raw: bytes, index: int) -> AttachmentFile | None:
    """Attachment ``index`` (as numbered by :func:`parse`), None when there is none."""
    if index < 0:
        return None
    try:
        message = _parse(raw)
        for position, part in enumerate(_attachment_parts(message)):
            if position == index:
                data = _leaf_bytes(part)
                declared = _content_type(part)
                return AttachmentFile(
                    _display_filename(part, index), _served_type(declared, data), data
                )
    except Exception:
        return None
    return None


def content_disposition(filename: str) -> str:
    """``Content-Disposition`` value to download ``filename`` (RFC 6266, RFC 5987).

    The quoted ``filename`` is a printable-ASCII fallback for old clients;
    ``filename*`` carries the UTF-8 name percent-encoded.  Neither can hold a
    quote, a backslash, a path separator, CR, LF or any control character.
    """
    name = _clean_filename(filename) or "piece-jointe"
    fallback = _ascii_fallback(name)
    encoded = urllib.parse.quote(name, safe="!#$&+-.^_`|~")  # RFC 5987 attr-char
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"


# --------------------------------------------------------------------------- structure

_Kind: TypeAlias = Literal["html", "plain", "other", "raw"]
_RANK: Final[dict[_Kind, int]] = {"html": 3, "plain": 2, "other": 1, "raw": 0}


@dataclass(frozen=True, slots=True)
class _Piece:
    kind: _Kind
    text: str


def _parse(raw: bytes) -> EmailMessage:
    return BytesParser(EmailMessage, policy=policy.default).parsebytes(raw)


def _children(part: Message) -> list[Message] | None:
    """The parts of a multipart entity; None when it is not one or is broken."""
    if not part.is_multipart():
        return None
    payload = part.get_payload()
    if not isinstance(payload, list):
        return None
    return [child for child in payload if isinstance(child, Message)]


def _is_multipart(part: Message) -> bool:
    return _maintype(part) == "multipart"


def _is_attachment(part: Message) -> bool:
    """The rule of :mod:`mssante.store.mime`, for a non-multipart part."""
    return (
        _disposition(part) == "attachment"
        or _raw_filename(part) is not None
        or _maintype(part) != "text"
    )


def _attachment_parts(message: Message) -> Iterator[Message]:
    """Attachments in walk order (the numbering URLs use)."""
    count = 0
    for part in _leaves(message, 0):
        if _is_attachment(part):
            if count >= MAX_ATTACHMENTS:  # the store lists no more either
                return
            count += 1
            yield part


def _leaves(part: Message, depth: int) -> Iterator[Message]:
    """Non-multipart parts in walk order; nesting followed as deep as the store does."""
    if not _is_multipart(part):
        yield part
        return
    children = _children(part)
    if children is None or depth >= MAX_DEPTH:
        return
    for child in children:
        yield from _leaves(child, depth + 1)


def _body(part: Message, depth: int) -> list[_Piece]:
    """The parts to show as the body, in order (RFC 2046 5.1)."""
    if not _is_multipart(part):
        if _is_attachment(part):
            return []
        subtype = _subtype(part)
        kind: _Kind = "html" if subtype == "html" else "plain" if subtype == "plain" else "other"
        return [_Piece(kind, _decode_text(_leaf_bytes(part), _charset(part)))]
    children = _children(part)
    if children is None:
        # Boundary missing or never found: the email package kept the body as
        # text; it is the best there is to show if nothing else is.
        data = _leaf_bytes(part)
        return [_Piece("raw", _decode_text(data, _charset(part)))] if data.strip() else []
    if depth >= MAX_DEPTH:
        return []
    subtype = _subtype(part)
    if subtype == "alternative":
        # RFC 2046 5.1.4: the last alternative is the richest; prefer HTML.
        best: list[_Piece] = []
        for child in children:
            found = _body(child, depth + 1)
            if found and (not best or _rank(found) >= _rank(best)):
                best = found
        return best
    if subtype == "related":
        # RFC 2387: the root (the start parameter, else the first part) is the body.
        root = _related_root(part, children)
        return _body(root, depth + 1) if root is not None else []
    # mixed, digest, signed, report, unknown subtypes: every inline part, in
    # order (a mail client that splits an HTML body around an attachment
    # sends several).
    return [piece for child in children for piece in _body(child, depth + 1)]


def _rank(pieces: list[_Piece]) -> int:
    return max(_RANK[piece.kind] for piece in pieces)


def _related_root(part: Message, children: list[Message]) -> Message | None:
    start = _guard(lambda: part.get_param("start"), None)
    if isinstance(start, str) and start.strip():
        for child in children:
            if _content_id(child) == start.strip():
                return child
    return children[0] if children else None


def _content_id(part: Message) -> str:
    return _guard(lambda: str(part.get("content-id", "")).strip(), "")


def _render(pieces: list[_Piece]) -> tuple[str | None, str | None]:
    """(html, text) from the body pieces; raw fallbacks only when nothing else."""
    shown = [piece for piece in pieces if piece.kind != "raw"] or pieces
    if not shown:
        return None, None
    if any(piece.kind == "html" for piece in shown):
        fragments = [
            sanitize_html(piece.text)
            if piece.kind == "html"
            else f"<pre>{html.escape(piece.text, quote=False)}</pre>"
            for piece in shown
        ]
        return "\n".join(fragments), None
    return None, "\n\n".join(piece.text for piece in shown)


def _fallback_text(raw: bytes) -> str:
    """The body of a message the parser gave up on, as text."""
    cut = [i for i in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if i >= 0]
    body = raw[min(cut) :].lstrip(b"\r\n") if cut else raw
    return _decode_text(body, None)


# --------------------------------------------------------------------------- part details


def _guard(read: Callable[[], _T], default: _T) -> _T:
    """``read()``, or ``default`` when the email package chokes on a header."""
    try:
        return read()
    except Exception:
        return default


def _content_type(part: Message) -> str:
    return _guard(lambda: part.get_content_type().lower(), part.get_default_type())


def _maintype(part: Message) -> str:
    return _content_type(part).partition("/")[0]


def _subtype(part: Message) -> str:
    return _content_type(part).partition("/")[2]


def _disposition(part: Message) -> str | None:
    return _guard(part.get_content_disposition, None)


def _charset(part: Message) -> str | None:
    return _guard(part.get_content_charset, None)


def _raw_filename(part: Message) -> str | None:
    """The declared file name, decoded as :mod:`mssante.store.mime` does, or None.

    First as the store reads it (compat32 on the raw fields: Windows-1252
    recovery, RFC 2047 words even where RFC 2231 forbids them), then as the
    ``email`` package's default policy does.
    """
    name = _guard(lambda: _compat_filename(part), None)
    if name is None:
        name = _guard(part.get_filename, None)
    if name is None:
        return None
    name = _unicode(name).strip()
    return name or None


def _compat_filename(part: Message) -> str | None:
    fields: Message = Message()
    seen: set[str] = set()
    for key, value in part.raw_items():
        lower = key.lower()
        if lower in ("content-type", "content-disposition") and lower not in seen:
            seen.add(lower)
            fields[key] = _recover(str(value)).replace("\r", "").replace("\n", "")
    name = fields.get_filename()
    if name is None:
        return None
    return _decode_words(_recover(name))


def _display_filename(part: Message, index: int) -> str:
    name = _clean_filename(_raw_filename(part) or "")
    if name:
        return name
    return f"piece-jointe-{index + 1}{_EXTENSIONS.get(_content_type(part), '')}"


def _leaf_bytes(part: Message) -> bytes:
    """The decoded content of a non-multipart part (a nested message as bytes)."""
    if part.is_multipart():  # message/*: the email package parsed it
        return _message_body_bytes(part)
    data = _guard(lambda: part.get_payload(decode=True), None)
    if isinstance(data, bytes):
        return data
    # The Content-Transfer-Encoding header defeated the email package: as is.
    text = _guard(part.get_payload, None)
    return _unicode(text).encode("utf-8") if isinstance(text, str) else b""


def _message_body_bytes(part: Message) -> bytes:
    """The body of a message/* part, as close to the received bytes as can be.

    compat32 without a line length writes the header fields as they were
    read; the default policy is the fallback when compat32 finds a field it
    will not write (an "embedded header").
    """
    keep = policy.compat32.clone(linesep="\r\n", max_line_length=None)
    for writer in (keep, policy.SMTP):
        out = io.BytesIO()
        try:
            BytesGenerator(out, mangle_from_=False, policy=writer).flatten(part)
        except Exception:  # noqa: S112 - the next writer is the fallback
            continue
        data = out.getvalue()
        if data.startswith(b"\r\n"):  # no header at all
            return data[2:]
        _, sep, body = data.partition(b"\r\n\r\n")
        return body if sep else b""
    return b""


def _served_type(declared: str, data: bytes) -> str:
    if declared == "text/plain":
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return OCTET_STREAM
        return _TEXT_PLAIN_UTF8
    return _SERVED.get(declared, OCTET_STREAM)


# --------------------------------------------------------------------------- text helpers


def _decode_text(data: bytes, charset: str | None) -> str:
    """``data`` as text: declared charset, else UTF-8, else Windows-1252 with replacement.

    Newlines are normalised to ``\\n``.
    """
    text = _strict_decode(data, charset) if charset else None
    if text is None:
        text = _strict_decode(data, "utf-8")
    if text is None:
        text = data.decode("cp1252", "replace")
    return _unicode(text).replace("\r\n", "\n").replace("\r", "\n")


def _strict_decode(data: bytes, charset: str) -> str | None:
    try:
        return data.decode(charset)
    except Exception:  # unknown charset, a bytes-to-bytes codec, invalid octets
        return None


def _unicode(value: str) -> str:
    """``value`` without lone surrogates (a codec may leave some), so it can be encoded."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace").decode("utf-8")
    return value


def _recover(value: str) -> str:
    """Raw 8-bit header octets (surrogate escapes): UTF-8, else Windows-1252."""
    try:
        data = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # surrogates that are not escaped octets
        return _unicode(value)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", "replace")


def _decode_words(value: str) -> str:
    """RFC 2047 encoded-words anywhere in ``value`` (mail software puts them in file names)."""
    if "=?" not in value:
        return value
    try:
        return _unicode(str(make_header(decode_header(value))))
    except Exception:
        return value


# Control and format characters (CR, LF, NUL, bidi overrides, zero-width),
# separators that are not spaces, and unpaired surrogates.
_DROP_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_FILENAME_TRANSLATION: Final = str.maketrans(
    {'"': None, "<": "_", ">": "_", ":": "_", "|": "_", "?": "_", "*": "_"}
)
_ASCII_SAFE: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 -_.()+,!#$&'=@[]^{}~"
)


def _printable(value: str) -> str:
    """``value`` without control or format characters; other whitespace becomes a space."""
    out = []
    for char in _unicode(value):
        category = unicodedata.category(char)
        if category in _DROP_CATEGORIES:
            if char in "\t\r\n":
                out.append(" ")
            continue
        out.append(" " if category == "Zs" else char)
    return "".join(out)


def _clean_filename(value: str) -> str:
    """A file name fit to show and to send: last path component, no control
    character, quote or separator, no leading dot, at most :data:`MAX_FILENAME`
    characters; empty when nothing is left."""
    name = unicodedata.normalize("NFC", _printable(value))
    name = re.split(r"[/\\]", name)[-1]
    name = " ".join(name.translate(_FILENAME_TRANSLATION).split())
    name = name.lstrip(". ").rstrip(". ")
    if len(name) > MAX_FILENAME:
        stem, dot, extension = name.rpartition(".")
        if dot and stem and 0 < len(extension) <= 16:
            name = stem[: MAX_FILENAME - len(extension) - 1].rstrip(". ") + "." + extension
        else:
            name = name[:MAX_FILENAME].rstrip(". ")
    return name


def _ascii_fallback(name: str) -> str:
    """Printable ASCII for the quoted ``filename`` parameter (RFC 6266 4.3)."""
    decomposed = unicodedata.normalize("NFKD", name)
    letters = "".join(char for char in decomposed if not unicodedata.combining(char))
    out = "".join(char if char in _ASCII_SAFE else "_" for char in letters)
    return out.lstrip(". ") or "piece-jointe"
