"""Streaming extraction of the metadata of a received message.

A received message is stored on disk exactly as it came over SMTP (CRLF line
endings; bare LF is tolerated).  :func:`summarize` reads it once, line by line,
and returns a :class:`MessageSummary`: the top-level headers the store needs
(addresses, subject, threading identifiers, the ``X-MSS-*`` headers) and the
list of attachments with their decoded sizes.

Memory stays bounded whatever the size of the message: the top-level header
block is capped at :data:`MAX_HEADER_BYTES`, each part's header block at
:data:`MAX_PART_HEADER_BYTES`, a physical line is read at most
``_LINE_LIMIT`` octets at a time, and decoders keep at most ``_FLUSH`` octets
pending.  Bodies are never kept: their decoded size is computed on the fly.

Nothing here raises on bad input.  Problems are reported as short English
sentences in :attr:`MessageSummary.defects`; problems that make the MIME
structure unreliable (missing or unterminated boundaries, malformed header
blocks, bad base64, nesting deeper than :data:`MAX_DEPTH`, an unexpected
internal error) also set :attr:`MessageSummary.broken`.
"""

from __future__ import annotations

import binascii
import email.utils
import io
import pathlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from email.header import decode_header, make_header
from email.message import Message
from email.policy import default as _DEFAULT_POLICY
from typing import Any, BinaryIO, Final, TypeAlias, TypeVar

__all__ = ["AttachmentInfo", "MessageSummary", "summarize", "summarize_bytes"]

MAX_HEADER_BYTES: Final = 1 << 20
"""Largest top-level header block read; beyond it the message is broken."""
MAX_PART_HEADER_BYTES: Final = 256 << 10
"""Largest header block of a body part."""
MAX_DEPTH: Final = 20
"""Deepest nesting of multipart entities that is followed."""
MAX_ATTACHMENTS: Final = 1000
"""Attachments listed at most (the rest are reported as a defect)."""
MAX_DEFECTS: Final = 100
"""Defects listed at most."""

_LINE_LIMIT: Final = 64 << 10  # longest chunk of a physical line read at once
_FLUSH: Final = 64 << 10  # decoders process their pending input by this much
_READ_BUFFER: Final = 64 << 10

_T = TypeVar("_T")
_End: TypeAlias = tuple[int, bool] | None
"""How a body ended: ``(boundary level, is closing delimiter)``, or None at EOF."""

# How a header block ended.
_H_BLANK: Final = 0  # the empty line: the body follows
_H_BODY: Final = 1  # a line that is not a header: it starts the body (pushed back)
_H_END: Final = 2  # a boundary delimiter or the end of the file
_H_TOO_LARGE: Final = 3  # the size limit was reached

_FIELD_RE: Final = re.compile(rb"([!-9;-~]+)[ \t]*:")
_TOKEN_RE: Final = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")
_MSGID_RE: Final = re.compile(r"<[^<>\s]+>")
_CTE_SPLIT_RE: Final = re.compile(r"[\s;(]")

_B64_ALPHABET: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_WHITESPACE: Final = b" \t\r\n\x0b\x0c"
_B64_NOT_ALPHABET: Final = bytes(sorted(set(range(256)) - set(_B64_ALPHABET + b"=")))
_B64_TOKEN_RE: Final = re.compile(rb"[^=]+|=+")
_B64_MAX_PROBLEMS: Final = 32  # then stop validating, only count

_SINGLETONS: Final = frozenset(
    {
        "from",
        "to",
        "cc",
        "subject",
        "date",
        "message-id",
        "in-reply-to",
        "references",
        "reply-to",
        "disposition-notification-to",
    }
)


@dataclass(frozen=True, slots=True)
class AttachmentInfo:
    """One attachment, in the order it appears in the message."""

    position: int
    """0-based order among attachments."""
    filename: str | None
    """Decoded file name (RFC 2231 / RFC 2047 / raw UTF-8), None when absent."""
    content_type: str
    """Lower-case ``type/subtype``."""
    size: int
    """Decoded size in octets."""


@dataclass(frozen=True, slots=True)
class MessageSummary:
    """What the store keeps of a received message."""

    from_address: str | None
    """addr-spec of the first From mailbox, lower-cased."""
    from_name: str | None
    """Decoded display name of that mailbox."""
    to: str | None
    """Decoded, unfolded To header."""
    cc: str | None
    """Decoded, unfolded Cc header."""
    subject: str | None
    """Decoded, unfolded Subject; None when absent."""
    date: str | None
    """Date header as written, unfolded."""
    message_id: str | None
    """``<...>`` form."""
    in_reply_to: list[str]
    """Message-ids (``<...>``) in In-Reply-To."""
    references: list[str]
    """Message-ids (``<...>``) in References, in order."""
    reply_to: str | None
    """addr-spec of the first Reply-To mailbox, lower-cased."""
    mss_headers: dict[str, str]
    """``X-MSS-*`` headers: name as first written -> unfolded, stripped value."""
    disposition_notification_to: str | None
    """addr-spec of Disposition-Notification-To, lower-cased."""
    attachments: list[AttachmentInfo]
    defects: list[str]
    """Short English descriptions of the problems found."""
    broken: bool
    """True when the MIME structure cannot be trusted."""


def summarize(path: pathlib.Path) -> MessageSummary:
    """Summarize the message stored at ``path`` (blocking, streaming).

    An error opening the file propagates (``OSError``); anything that goes
    wrong afterwards, including a read error, is reported in the summary.
    """
    with path.open("rb", buffering=_READ_BUFFER) as stream:
        return summarize_stream(stream)


def summarize_bytes(data: bytes) -> MessageSummary:
    """Summarize a message held in memory (tests, small inputs)."""
    return summarize_stream(io.BytesIO(data))


def summarize_stream(stream: BinaryIO) -> MessageSummary:
    parser = _Parser(stream)
    try:
        parser.run()
    except Exception as exc:  # never raise: whatever was gathered is returned
        parser.defect(f"internal error while parsing ({_describe(exc)})")
    return parser.summary()


# --------------------------------------------------------------------------- text helpers


def _text(value: str) -> str:
    """Make ``value`` clean Unicode.

    Header bytes are decoded as UTF-8 with ``surrogateescape``; when they were
    not valid UTF-8 they are re-decoded as Windows-1252 (the usual legacy
    charset of French mail).  NUL is dropped and CR/LF become spaces.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        try:
            raw = value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            value = value.encode("utf-8", "replace").decode("utf-8")
        else:
            try:
                value = raw.decode("utf-8")
            except UnicodeDecodeError:
                value = raw.decode("cp1252", "replace")
    if "\x00" in value or "\r" in value or "\n" in value:
        value = value.replace("\x00", "").replace("\r", " ").replace("\n", " ")
    return value


def _is_utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unfold(raw: bytes | bytearray) -> str:
    """Unfold a raw field body; the result may hold surrogate escapes."""
    data = bytes(raw).replace(b"\r", b"").replace(b"\n", b"")
    return data.decode("utf-8", "surrogateescape").strip(" \t")


def _decode_words(value: str) -> str:
    """Decode RFC 2047 encoded-words anywhere in ``value``."""
    if "=?" not in value:
        return value
    try:
        decoded = str(_DEFAULT_POLICY.header_factory("x-mssante-text", value))
    except Exception:
        try:
            decoded = str(make_header(decode_header(value)))
        except Exception:
            return value
    return _text(decoded)


def _message_ids(value: str) -> list[str]:
    return _MSGID_RE.findall(value)


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


def _eol_length(line: bytes) -> int:
    if line.endswith(b"\r\n"):
        return 2
    if line.endswith(b"\n"):
        return 1
    return 0


# --------------------------------------------------------------------------- size counters


class _Counter:
    """Computes the decoded size of a body fed line by line."""

    __slots__ = ("problems", "size")

    def __init__(self) -> None:
        self.size = 0
        self.problems: list[str] = []

    def feed(self, line: bytes) -> None:
        raise NotImplementedError

    def finish(self, at_boundary: bool) -> int:
        """Return the size; ``at_boundary``: the last line break belongs to a delimiter."""
        raise NotImplementedError

    def _problem(self, text: str) -> None:
        if text not in self.problems:
            self.problems.append(text)


class _RawCounter(_Counter):
    """7bit, 8bit, binary (and unknown encodings): octets as they are."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        super().__init__()
        self._last = b""

    def feed(self, line: bytes) -> None:
        self.size += len(line)
        self._last = line

    def finish(self, at_boundary: bool) -> int:
        if at_boundary:
            self.size -= _eol_length(self._last)
        return self.size


class _QuotedPrintableCounter(_Counter):
    """quoted-printable, decoded with :func:`binascii.a2b_qp` by whole lines."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        super().__init__()
        self._pending = bytearray()

    def feed(self, line: bytes) -> None:
        self._pending += line
        if len(self._pending) >= _FLUSH:
            self._flush()

    def _flush(self) -> None:
        # Decode everything but the last line, which may be followed by a
        # delimiter (its line break is then not part of the body).
        pending = self._pending
        cut = pending.rfind(b"\n", 0, len(pending) - 1) + 1
        if cut == 0:  # one huge line: do not split an "=XY" escape or a soft break
            cut = len(pending) - 3
            if cut <= 0:
                return
            escape = pending.find(b"=", max(0, cut - 2), cut)
            if escape >= 0:
                cut = escape
        self.size += len(binascii.a2b_qp(bytes(pending[:cut])))
        del pending[:cut]

    def finish(self, at_boundary: bool) -> int:
        pending = self._pending
        if at_boundary:
            if pending.endswith(b"\r\n"):
                del pending[-2:]
            elif pending.endswith(b"\n"):
                del pending[-1:]
        self.size += len(binascii.a2b_qp(bytes(pending)))
        pending.clear()
        return self.size


class _Base64Counter(_Counter):
    """base64: the decoded size follows from the count of alphabet characters.

    Every 4 characters decode to 3 octets, a final quantum of 2 (3) characters
    padded with ``==`` (``=``) to 1 (2) octets: this is exactly the length
    :func:`binascii.a2b_base64` would return, without allocating the output.
    Invalid characters, bad or missing padding and data after the padding are
    reported; the size is then a best effort (invalid characters are skipped,
    data after padding is decoded as a new stream, as lenient decoders do).
    """

    __slots__ = ("_bad", "_lenient", "_padded", "_pads_left", "_pending", "_quad")

    def __init__(self) -> None:
        super().__init__()
        self._pending = bytearray()
        self._quad = 0  # characters of the current 4-character quantum
        self._pads_left = 0  # "=" still expected to complete the padding
        self._padded = False  # the padding was completed
        self._lenient = False  # too many problems: only count characters
        self._bad = 0

    def feed(self, line: bytes) -> None:
        self._pending += line
        if len(self._pending) >= _FLUSH:
            self._flush()

    def _problem(self, text: str) -> None:
        super()._problem(text)
        self._bad += 1
        if self._bad > _B64_MAX_PROBLEMS:
            self._lenient = True

    def _flush(self) -> None:
        data = self._pending.translate(None, _B64_WHITESPACE)
        self._pending.clear()
        if not data:
            return
        clean = data.translate(None, _B64_NOT_ALPHABET)
        if len(clean) != len(data):
            self._problem("invalid characters in base64 data")
        if self._lenient:
            self._data(len(clean) - clean.count(b"="))
            return
        if not self._padded and not self._pads_left and b"=" not in clean:
            self._data(len(clean))  # the common case: one step, no token loop
            return
        for match in _B64_TOKEN_RE.finditer(clean):
            if self._lenient:
                rest = clean[match.start() :]
                self._data(len(rest) - rest.count(b"="))
                return
            length = match.end() - match.start()
            if clean[match.start()] == 0x3D:  # "="
                self._pad(length)
            else:
                if self._pads_left:
                    self._problem("incomplete base64 padding")
                    self._pads_left = 0
                elif self._padded:
                    self._problem("base64 data after the padding")
                self._padded = False
                self._data(length)

    def _data(self, count: int) -> None:
        total = self._quad + count
        self.size += total // 4 * 3
        self._quad = total % 4

    def _pad(self, count: int) -> None:
        if self._pads_left:
            if count > self._pads_left:
                self._problem("too much base64 padding")
            self._pads_left = max(0, self._pads_left - count)
            self._padded = not self._pads_left
        elif self._padded:
            self._problem("too much base64 padding")
        elif self._quad >= 2:
            self.size += self._quad - 1
            needed = 4 - self._quad
            self._quad = 0
            if count > needed:
                self._problem("too much base64 padding")
            self._pads_left = max(0, needed - count)
            self._padded = not self._pads_left
        else:
            self._problem("misplaced base64 padding")

    def finish(self, at_boundary: bool) -> int:
        self._flush()
        if self._pads_left:
            self._problem("incomplete base64 padding")
        elif self._quad == 1:
            self._problem("truncated base64 data")
        elif self._quad:
            self._problem("missing base64 padding")
            self.size += self._quad - 1
        self._quad = 0
        return self.size


def _counter_for(encoding: str) -> _Counter:
    if encoding == "base64":
        return _Base64Counter()
    if encoding == "quoted-printable":
        return _QuotedPrintableCounter()
    return _RawCounter()


# --------------------------------------------------------------------------- MIME parser


@dataclass(slots=True)
class _MimeInfo:
    content_type: str
    boundary: str | None
    disposition: str | None
    filename: str | None
    encoding: str

    @property
    def maintype(self) -> str:
        return self.content_type.partition("/")[0]

    @property
    def subtype(self) -> str:
        return self.content_type.partition("/")[2]


class _Parser:
    """One streaming pass over a message.

    The stack of open multipart boundaries is kept in ``_boundaries`` (outermost
    first) with a reverse index; each line that starts with ``--`` at the start
    of a physical line is looked up there, which ends the current body part.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._readline: Callable[[int], bytes] = stream.readline
        self._pushback: bytes | None = None
        self._pending_end: tuple[int, bool] | None = None
        self._eof = False
        self._at_start = True
        self._boundaries: list[bytes] = []
        self._boundary_index: dict[bytes, int] = {}
        self._path: list[int] = []
        self._defects: list[str] = []
        self._broken = False
        self._attachments: list[AttachmentInfo] = []
        # top-level headers
        self._from_address: str | None = None
        self._from_name: str | None = None
        self._to: str | None = None
        self._cc: str | None = None
        self._subject: str | None = None
        self._date: str | None = None
        self._message_id: str | None = None
        self._in_reply_to: list[str] = []
        self._references: list[str] = []
        self._reply_to: str | None = None
        self._mss_headers: dict[str, str] = {}
        self._dnt: str | None = None

    # -- reporting --------------------------------------------------------

    def defect(self, text: str, *, broken: bool = True) -> None:
        if broken:
            self._broken = True
        where = "message" if not self._path else "part " + ".".join(map(str, self._path))
        entry = f"{where}: {text}"
        if entry in self._defects:
            return
        if len(self._defects) < MAX_DEFECTS:
            self._defects.append(entry)
        elif len(self._defects) == MAX_DEFECTS:
            self._defects.append("further defects omitted")

    def summary(self) -> MessageSummary:
        return MessageSummary(
            from_address=self._from_address,
            from_name=self._from_name,
            to=self._to,
            cc=self._cc,
            subject=self._subject,
            date=self._date,
            message_id=self._message_id,
            in_reply_to=list(self._in_reply_to),
            references=list(self._references),
            reply_to=self._reply_to,
            mss_headers=dict(self._mss_headers),
            disposition_notification_to=self._dnt,
            attachments=list(self._attachments),
            defects=list(self._defects),
            broken=self._broken,
        )

    def _guarded(self, what: str, fn: Callable[[str], _T], value: str, default: _T) -> _T:
        """``fn(value)``; an unexpected exception becomes a defect and ``default``."""
        try:
            return fn(value)
        except Exception as exc:
            self.defect(f"internal error while reading {what} ({_describe(exc)})")
            return default

    # -- driver -------------------------------------------------------------

    def run(self) -> None:
        fields, end, size = self._read_headers(MAX_HEADER_BYTES, top=True)
        if size == 0:
            self.defect("empty message")
            return
        self._top_headers(fields)
        if end == _H_TOO_LARGE:
            return
        info = self._mime_info(fields, "text/plain")
        self._entity(info, 0)

    # -- reading --------------------------------------------------------------

    def _match(self, line: bytes) -> _End:
        rest = line[2:].rstrip(b" \t\r\n")
        level = self._boundary_index.get(rest)
        if level is not None:
            return level, False
        if rest.endswith(b"--"):
            level = self._boundary_index.get(rest[:-2])
            if level is not None:
                return level, True
        return None

    def _scan(self, counter: _Counter | None) -> _End:
        """Consume a body up to the next delimiter of an open multipart, or EOF."""
        if self._eof:
            return None
        pending = self._pending_end
        if pending is not None:
            self._pending_end = None
            return pending
        readline = self._readline
        check = bool(self._boundary_index)
        feed = counter.feed if counter is not None else None
        at_start = self._at_start
        line = self._pushback
        self._pushback = None
        if line is None:
            line = readline(_LINE_LIMIT)
        while line:
            if check and at_start and line.startswith(b"--"):
                end = self._match(line)
                if end is not None:
                    self._at_start = True
                    return end
            if feed is not None:
                feed(line)
            at_start = line.endswith(b"\n")
            line = readline(_LINE_LIMIT)
        self._eof = True
        self._at_start = at_start
        return None

    def _read_headers(
        self, limit: int, *, top: bool = False
    ) -> tuple[list[tuple[str, bytearray]], int, int]:
        """Read a header block: (fields, how it ended, octets read)."""
        fields: list[tuple[str, bytearray]] = []
        if self._eof:
            return fields, _H_END, 0
        if self._pending_end is not None:
            return fields, _H_END, 0
        readline = self._readline
        check = bool(self._boundary_index)
        at_start = self._at_start
        total = 0
        first = True
        line = self._pushback
        self._pushback = None
        if line is None:
            line = readline(_LINE_LIMIT)
        while line:
            total += len(line)
            if total > limit:
                self.defect(f"header block larger than {limit} octets")
                self._at_start = line.endswith(b"\n")
                return fields, _H_TOO_LARGE, total
            if not at_start:  # rest of a physical line longer than _LINE_LIMIT
                if fields:
                    fields[-1][1].extend(line)
            elif check and line.startswith(b"--") and (end := self._match(line)) is not None:
                self._pending_end = end
                self._at_start = True
                return fields, _H_END, total
            elif line in (b"\r\n", b"\n"):
                self._at_start = True
                return fields, _H_BLANK, total
            elif line[0] in (0x20, 0x09):  # folded continuation
                if fields:
                    fields[-1][1].extend(line)
                else:
                    self.defect("header block starts with a continuation line", broken=False)
            elif (match := _FIELD_RE.match(line)) is not None:
                fields.append((match.group(1).decode("ascii"), bytearray(line[match.end() :])))
            elif top and first and line.startswith(b"From "):
                self.defect("mbox 'From ' line before the headers ignored", broken=False)
            else:
                self.defect("malformed header line (no blank line before the body?)")
                self._pushback = line
                self._at_start = True
                return fields, _H_BODY, total
            first = False
            at_start = line.endswith(b"\n")
            line = readline(_LINE_LIMIT)
        self._eof = True
        self._at_start = at_start
        return fields, _H_END, total

    # -- top-level headers ------------------------------------------------------

    def _top_headers(self, fields: list[tuple[str, bytearray]]) -> None:
        values: dict[str, str] = {}
        mss_seen: set[str] = set()
        for name, raw in fields:
            key = name.lower()
            if key.startswith("x-mss-"):
                if key not in mss_seen:
                    mss_seen.add(key)
                    self._mss_headers[name] = _text(_unfold(raw))
                continue
            if key not in _SINGLETONS:
                continue
            if key in values:
                self.defect(f"more than one {name} header; the first is used", broken=False)
                continue
            value = _unfold(raw)
            if not _is_utf8(value):
                self.defect(f"{name} header is not valid UTF-8", broken=False)
            values[key] = _text(value)

        def decoded(key: str, name: str) -> str | None:
            value = values.get(key)
            if value is None:
                return None
            return self._guarded(name, _decode_words, value, value)

        def address(key: str, name: str) -> str | None:
            value = values.get(key)
            if value is None:
                return None
            nothing: str | None = None
            return self._guarded(name, lambda v: self._mailbox(name, v)[0], value, nothing)

        sender = values.get("from")
        if sender is not None:
            nobody: tuple[str | None, str | None] = (None, None)
            self._from_address, self._from_name = self._guarded(
                "From", lambda v: self._mailbox("From", v), sender, nobody
            )
        self._to = decoded("to", "To")
        self._cc = decoded("cc", "Cc")
        self._subject = decoded("subject", "Subject")
        self._date = values.get("date")
        message_id = values.get("message-id")
        if message_id is not None:
            self._message_id = self._guarded("Message-ID", self._msgid, message_id, None)
        self._in_reply_to = _message_ids(values.get("in-reply-to", ""))
        self._references = _message_ids(values.get("references", ""))
        self._reply_to = address("reply-to", "Reply-To")
        self._dnt = address("disposition-notification-to", "Disposition-Notification-To")

    def _mailbox(self, name: str, value: str) -> tuple[str | None, str | None]:
        """(addr-spec lower-cased, display name) of the first mailbox with an address."""
        candidates: list[tuple[str, str]] = []
        try:
            header: Any = _DEFAULT_POLICY.header_factory("to", value)  # any address header
            candidates = [(str(a.addr_spec), str(a.display_name)) for a in header.addresses]
        except Exception:
            self.defect(f"malformed {name} header", broken=False)
            candidates = [
                (address, _decode_words(display))
                for display, address in email.utils.getaddresses([value])
            ]
        for address, display in candidates:
            address = _text(address).strip()
            if "@" in address:
                return address.lower(), (_text(display).strip() or None)
        self.defect(f"no valid address in {name} header", broken=False)
        return None, None

    def _msgid(self, value: str) -> str | None:
        found = _message_ids(value)
        if found:
            return found[0]
        value = value.strip()
        if value and "<" not in value and ">" not in value and not any(c.isspace() for c in value):
            self.defect("Message-ID without angle brackets", broken=False)
            return f"<{value}>"
        self.defect("malformed Message-ID header", broken=False)
        return None

    # -- MIME structure ---------------------------------------------------------

    def _mime_info(self, fields: list[tuple[str, bytearray]], default_type: str) -> _MimeInfo:
        found: dict[str, str] = {}
        for name, raw in fields:
            key = name.lower()
            if key in ("content-type", "content-disposition", "content-transfer-encoding"):
                if key in found:
                    self.defect(f"more than one {name} header; the first is used", broken=False)
                else:
                    found[key] = _text(_unfold(raw))
        try:
            return self._mime_info_from(found, default_type)
        except Exception as exc:
            self.defect(f"unreadable MIME headers ({_describe(exc)})")
            return _MimeInfo(default_type, None, None, None, "7bit")

    def _mime_info_from(self, found: dict[str, str], default_type: str) -> _MimeInfo:
        message: Message[str, str] = Message()
        content_type = default_type
        raw_type = found.get("content-type")
        if raw_type is not None:
            message["Content-Type"] = raw_type
            parts = [p.strip().lower() for p in raw_type.partition(";")[0].split("/")]
            if len(parts) == 2 and all(_TOKEN_RE.fullmatch(p) for p in parts):
                content_type = "/".join(parts)
            else:
                self.defect(f"invalid Content-Type {raw_type[:80]!r}; read as text/plain")
                content_type = "text/plain"
        raw_disposition = found.get("content-disposition")
        if raw_disposition is not None:
            message["Content-Disposition"] = raw_disposition
        boundary = message.get_boundary() if content_type.startswith("multipart/") else None
        filename = message.get_filename()
        if filename is not None:
            filename = _decode_words(_text(filename)).strip() or None
        encoding = found.get("content-transfer-encoding", "7bit")
        encoding = _CTE_SPLIT_RE.split(encoding.strip().lower(), maxsplit=1)[0] or "7bit"
        return _MimeInfo(
            content_type=content_type,
            boundary=boundary or None,
            disposition=message.get_content_disposition(),
            filename=filename,
            encoding=encoding,
        )

    def _entity(self, info: _MimeInfo, depth: int) -> _End:
        """Consume the body of an entity whose header block was read."""
        if info.maintype == "multipart":
            return self._multipart(info, depth)
        if info.encoding not in ("7bit", "8bit", "binary", "base64", "quoted-printable"):
            self.defect(
                f"unknown Content-Transfer-Encoding {info.encoding[:40]!r}; size not decoded",
                broken=False,
            )
        counter = _counter_for(info.encoding)
        end = self._scan(counter)
        size = counter.finish(end is not None)
        for problem in counter.problems:
            self.defect(problem)
        if info.disposition == "attachment" or info.filename is not None or info.maintype != "text":
            self._add_attachment(info, size)
        return end

    def _add_attachment(self, info: _MimeInfo, size: int) -> None:
        position = len(self._attachments)
        if position >= MAX_ATTACHMENTS:
            self.defect(f"more than {MAX_ATTACHMENTS} attachments; the rest are not listed")
            return
        self._attachments.append(AttachmentInfo(position, info.filename, info.content_type, size))

    def _multipart(self, info: _MimeInfo, depth: int) -> _End:
        kind = info.content_type
        if info.encoding not in ("7bit", "8bit", "binary"):
            self.defect(
                f"{kind} with Content-Transfer-Encoding {info.encoding[:40]!r}", broken=False
            )
        if info.boundary is None:
            self.defect(f"{kind} without boundary parameter")
            return self._scan(None)
        if depth >= MAX_DEPTH:
            self.defect(f"multipart nesting deeper than {MAX_DEPTH} levels; not followed")
            return self._scan(None)
        boundary = info.boundary.encode("utf-8", "replace")
        if boundary in self._boundary_index:
            self.defect(f"{kind} reuses the boundary of an enclosing multipart")
            return self._scan(None)

        level = len(self._boundaries)
        self._boundaries.append(boundary)
        self._boundary_index[boundary] = level
        try:
            end = self._scan(None)  # preamble
            child_type = "message/rfc822" if info.subtype == "digest" else "text/plain"
            count = 0
            while True:
                if end is None or end[0] < level:
                    if count:
                        self.defect(f"{kind} without closing boundary")
                    else:
                        self.defect(f"{kind} body without any boundary delimiter")
                    return end
                if end[1]:  # closing delimiter
                    if not count:
                        self.defect(f"{kind} without any body part", broken=False)
                    break
                count += 1
                # Not unwound on error: an internal error is reported where it happened.
                self._path.append(count)
                end = self._part(child_type, depth + 1)
                self._path.pop()
        finally:
            del self._boundary_index[boundary]
            self._boundaries.pop()
        return self._scan(None)  # epilogue

    def _part(self, default_type: str, depth: int) -> _End:
        fields, how, _ = self._read_headers(MAX_PART_HEADER_BYTES)
        if how == _H_TOO_LARGE:
            return self._scan(None)
        info = self._mime_info(fields, default_type)
        return self._entity(info, depth)
