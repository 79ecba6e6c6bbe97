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

Cost: the ``email`` package is quadratic on some hostile inputs (header
parameters, deeply nested multiparts).  MIME parameter fields are read
bounded (:data:`MAX_MIME_FIELD`), and a message nested too deep for its size
(:data:`MAX_NESTING_COST`) or with too many parts (:data:`MAX_PARTS`) is not
MIME-parsed but shown as text.
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
from email.message import Message
from email.parser import BytesParser
from email.policy import EmailPolicy
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
MAX_MIME_FIELD: Final = 16384
"""Characters of a Content-Type / Content-Disposition field that are read
(a 255-character file name in a non-Latin script takes 2,500 encoded)."""
MAX_MIME_PARAMETERS: Final = 64
"""Parameters of such a field that are read (RFC 2231 continuations included)."""
MAX_NESTING: Final = 50
"""Multipart bodies open at once beyond which a message is shown as text."""
MAX_NESTING_COST: Final = 5_000_000
"""Open multipart bodies x lines beyond which a message is shown as text.

The ``email`` feed parser tests every line against every open boundary: a
hostile message 100 levels deep with 100,000 short lines takes 5 s.
"""
MAX_PARTS: Final = 2 * MAX_ATTACHMENTS
"""Body parts beyond which a message is shown as text (the feed parser
takes about 0.5 ms a part)."""
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
# event handler, no title.  The "*" entry must be there: without it Ammonia
# keeps its default generic attributes (title and lang on every tag).
_ATTRIBUTES: Final[dict[str, set[str]]] = {
    "*": set(),
    "a": {"href"},
    "td": {"colspan", "rowspan"},
    "th": {"colspan", "rowspan"},
}

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
        root = _tree(raw)
        if root is None:
            return DisplayMessage(None, _fallback_text(raw), [])
        attachments = [
            AttachmentInfo(index, _display_filename(node, index), node.content_type, len(data))
            for index, node in enumerate(_attachments(root))
            for data in (_leaf_bytes(node.part),)
        ]
        html_body, text_body = _render(_body(root))
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
        root = _tree(raw)
        if root is None:
            return None
        for position, node in enumerate(_attachments(root)):
            if position == index:
                data = _leaf_bytes(node.part)
                served = _served_type(node.content_type, data)
                return AttachmentFile(_display_filename(node, index), served, data)
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


# --------------------------------------------------------------------------- parsing

_MIME_FIELDS: Final = frozenset(
    {"content-type", "content-disposition", "content-transfer-encoding"}
)


class _ReadingPolicy(EmailPolicy):
    """``policy.default``, except that the MIME fields are read as plain strings.

    The default policy's header parser is quadratic on hostile parameter
    lists (16 KB of ";" take 6 s); these fields are cut to
    :data:`MAX_MIME_FIELD` characters and :data:`MAX_MIME_PARAMETERS`
    parameters and read by ``Message``'s compat32 parameter code, as
    :mod:`mssante.store.mime` reads them.
    """

    def header_fetch_parse(self, name: str, value: str) -> str:
        if name.lower() not in _MIME_FIELDS:
            parsed: str = super().header_fetch_parse(name, value)
            return parsed
        value = value[:MAX_MIME_FIELD].replace("\r", "").replace("\n", "")
        cut = -1
        for _ in range(MAX_MIME_PARAMETERS + 1):
            cut = value.find(";", cut + 1)
            if cut < 0:
                return value
        return value[:cut]


_POLICY: Final = _ReadingPolicy()

_BOUNDARY_PARAMETER: Final = re.compile(
    rb"boundary\*?\d*\*?[ \t]*=[ \t]*(?:\"([^\"\r\n]*)\"|([^\s;\"]*))", re.IGNORECASE
)
_DELIMITER_LINE: Final = re.compile(rb"\n--([^\r\n]*)")


def _too_complex(raw: bytes) -> bool:
    """Whether the feed parser would take too long: too many parts, or too
    many multipart bodies open at once for the size.

    An upper bound of the nesting: every boundary parameter opens a body; a
    delimiter line closes those opened after its own (RFC 2046 5.1.1: an
    inner part ends at an outer delimiter), a close delimiter its own too.
    Offsets are found with ``bytes.find``: a regular expression tried at every
    offset of a 25 MB message takes half a second.  At worst (millions of
    lines starting with ``--``) this costs about what parsing would.
    """
    lines = max(raw.count(b"\n"), raw.count(b"\r")) + 1  # the feed parser also ends lines at CR
    limit = min(MAX_NESTING, MAX_NESTING_COST // lines)
    events: list[tuple[int, bytes, bool]] = []  # (offset, boundary, is a parameter)
    lowered = raw.lower()
    at = lowered.find(b"boundary")
    while at >= 0:
        match = _BOUNDARY_PARAMETER.match(raw, at)
        if match is not None:
            if len(events) >= 100 * MAX_NESTING:
                return True
            quoted = match.group(1)
            events.append((at, quoted if quoted is not None else match.group(2), True))
        at = lowered.find(b"boundary", at + 8)
    if len(events) <= limit and raw.count(b"\n--") < MAX_PARTS:
        return False  # the common case: neither bound can be passed
    wanted = {name for _, name, _ in events}
    wanted |= {name + b"--" for name in wanted}
    for match in _DELIMITER_LINE.finditer(b"\n" + raw):
        name = match.group(1).rstrip(b" \t")
        if name in wanted:
            events.append((match.start(), name, False))
    events.sort(key=lambda event: event[0])

    open_boundaries: list[bytes] = []
    parts = 0
    for _, name, is_parameter in events:
        if is_parameter:
            open_boundaries.append(name)
            if len(open_boundaries) > limit:
                return True
            continue
        closing = name.endswith(b"--")
        for level in range(len(open_boundaries) - 1, -1, -1):  # at most ``limit`` steps
            if open_boundaries[level] == name:
                del open_boundaries[level + 1 :]
                parts += 1
                if parts > MAX_PARTS:
                    return True
                break
            if closing and open_boundaries[level] == name[:-2]:
                del open_boundaries[level:]
                break
    return False


def _parse(raw: bytes) -> Message | None:
    """The parsed message, or None when parsing it would cost too much."""
    if _too_complex(raw):
        return None
    return BytesParser(policy=_POLICY).parsebytes(raw)  # EmailMessage objects


@dataclass(frozen=True, slots=True)
class _Node:
    """A part with its MIME fields read once."""

    part: Message
    content_type: str
    disposition: str | None
    filename: str | None
    """Declared file name, decoded, None when absent or empty."""
    children: list[_Node] | None
    """Parts of a multipart; None for a leaf, a broken or a too-deep multipart."""

    @property
    def maintype(self) -> str:
        return self.content_type.partition("/")[0]

    @property
    def subtype(self) -> str:
        return self.content_type.partition("/")[2]

    @property
    def is_attachment(self) -> bool:
        """The rule of :mod:`mssante.store.mime`, for a part that is not multipart."""
        named = self.filename is not None
        return self.disposition == "attachment" or named or self.maintype != "text"


def _tree(raw: bytes) -> _Node | None:
    message = _parse(raw)
    return None if message is None else _node(message, 0)


def _node(part: Message, depth: int) -> _Node:
    content_type = _guard(lambda: part.get_content_type().lower(), part.get_default_type())
    children = None
    # Nesting followed as deep as the store follows it: same numbering.
    if content_type.startswith("multipart/") and part.is_multipart() and depth < MAX_DEPTH:
        payload = part.get_payload()
        if isinstance(payload, list):
            children = [_node(child, depth + 1) for child in payload if isinstance(child, Message)]
    return _Node(
        part=part,
        content_type=content_type,
        disposition=_guard(part.get_content_disposition, None),
        filename=_guard(lambda: _declared_filename(part), None),
        children=children,
    )


def _attachments(root: _Node) -> Iterator[_Node]:
    """Attachments in walk order (the numbering URLs use)."""
    count = 0
    for node in _leaves(root):
        if node.is_attachment:
            if count >= MAX_ATTACHMENTS:  # the store lists no more either
                return
            count += 1
            yield node


def _leaves(node: _Node) -> Iterator[_Node]:
    if node.maintype != "multipart":
        yield node
    elif node.children is not None:
        for child in node.children:
            yield from _leaves(child)


# --------------------------------------------------------------------------- the body

_Kind: TypeAlias = Literal["html", "plain", "other", "raw"]
_RANK: Final[dict[_Kind, int]] = {"html": 3, "plain": 2, "other": 1, "raw": 0}


@dataclass(frozen=True, slots=True)
class _Piece:
    kind: _Kind
    text: str


def _body(node: _Node) -> list[_Piece]:
    """The parts to show as the body, in order (RFC 2046 5.1)."""
    if node.maintype != "multipart":
        if node.is_attachment:
            return []
        subtype = node.subtype
        kind: _Kind = "html" if subtype == "html" else "plain" if subtype == "plain" else "other"
        return [_Piece(kind, _part_text(node))]
    if node.children is None:
        if node.part.is_multipart():  # nested deeper than the store follows
            return []
        # Boundary missing or never found: the email package kept the body as
        # text; it is the best there is to show if nothing else is.
        text = _part_text(node)
        return [_Piece("raw", text)] if text.strip() else []
    if node.subtype == "alternative":
        # RFC 2046 5.1.4: the last alternative is the richest; HTML is preferred.
        best: list[_Piece] = []
        for child in node.children:
            found = _body(child)
            if found and (not best or _rank(found) >= _rank(best)):
                best = found
        return best
    if node.subtype == "related":
        # RFC 2387 3.1: the root (the start parameter, else the first part).
        root = _related_root(node)
        return _body(root) if root is not None else []
    # mixed, digest, signed, report, unknown subtypes: every inline part, in
    # order (some mail software splits an HTML body around an attachment).
    return [piece for child in node.children for piece in _body(child)]


def _rank(pieces: list[_Piece]) -> int:
    return max(_RANK[piece.kind] for piece in pieces)


def _related_root(node: _Node) -> _Node | None:
    children = node.children or []
    start = _guard(lambda: node.part.get_param("start"), None)
    if isinstance(start, str) and start.strip():
        for child in children:
            if _content_id(child) == start.strip():
                return child
    return children[0] if children else None


def _content_id(node: _Node) -> str:
    return _guard(lambda: str(node.part.get("content-id", "")), "").strip()


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
    """The body of a message that is not MIME-parsed, as text."""
    cuts = [i for i in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if i >= 0]
    body = raw[min(cuts) :].lstrip(b"\r\n") if cuts else raw
    return _decode_text(body, None)


# --------------------------------------------------------------------------- part contents


def _guard(read: Callable[[], _T], default: _T) -> _T:
    """``read()``, or ``default`` when the email package chokes on a header."""
    try:
        return read()
    except Exception:
        return default


def _declared_filename(part: Message) -> str | None:
    """The file name as :mod:`mssante.store.mime` reads it (RFC 2231, RFC 2047, raw 8-bit)."""
    name = part.get_filename()
    if name is None:
        return None
    return _decode_words(_recover(name)).strip() or None


def _display_filename(node: _Node, index: int) -> str:
    name = _clean_filename(node.filename or "")
    if name:
        return name
    return f"piece-jointe-{index + 1}{_EXTENSIONS.get(node.content_type, '')}"


def _part_text(node: _Node) -> str:
    charset = _guard(node.part.get_content_charset, None)
    return _decode_text(_leaf_bytes(node.part), charset)


def _leaf_bytes(part: Message) -> bytes:
    """The decoded content of a part that is not multipart (a nested message as bytes)."""
    if part.is_multipart():  # message/*: the email package parsed it
        return _message_body_bytes(part)
    data = _guard(lambda: part.get_payload(decode=True), None)
    if isinstance(data, bytes):
        return data
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
    # Not ";", "=" or "%": naive parsers split on them or percent-decode.
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 -_.()+,!#$&'@[]^{}~"
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
    out = "".join(char if char in _ASCII_SAFE else "_" for char in letters).lstrip(". ")
    stem, dot, extension = out.rpartition(".")
    if not dot:
        stem, extension = out, ""
    if not any(char.isalnum() for char in stem):  # a name in another script: "__.pdf"
        out = "piece-jointe" + (f".{extension}" if extension.isalnum() else "")
    return out
