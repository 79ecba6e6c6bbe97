"""DKIM: verification of received signatures, signing of our own mail.

**Verification** (RFC 6376 6) of inbound messages produces one
:class:`DkimResult` per ``DKIM-Signature`` header field (the topmost
``max_signatures``), with the RFC 8601 2.7.1 result keywords.  The result is
recorded as an ``Authentication-Results`` header field
(:meth:`DkimVerifier.authentication_results`) that the store keeps *beside*
the message, like the Received header: the received bytes are never
rewritten (STYLE.md 6).  A per-domain policy
(:meth:`DkimVerifier.policy_allows`) can require a valid signature from the
sender's domain.

How a message is verified, without holding it in memory (a message may be
25 MB):

1. in a worker thread, read the header block (at most
   :data:`MAX_HEADER_BYTES`) and parse each DKIM-Signature (RFC 6376 3.5);
2. on the event loop, fetch each distinct key record
   (``<s>._domainkey.<d>``, RFC 6376 3.6.2.1) through the injected
   :data:`Resolver`, concurrently, each under a timeout;
3. in a worker thread, stream the body once through the simple and/or
   relaxed body canonicalisations (RFC 6376 3.4.3, 3.4.4) into one SHA-256
   per distinct (canonicalisation, ``l=``) pair, then check each header
   signature (RFC 6376 3.7) with ``cryptography``.

dkimpy is not used at run time, on purpose: ``dkim.DKIM`` needs the whole
message in memory, its RSA is pure Python (tens of milliseconds per
operation) and its Ed25519 needs PyNaCl, which the project does not install.
The tests use dkimpy as an independent implementation to check that our
signatures verify there and that its signatures verify here.

**Plugging in the DNS.**  A :data:`Resolver` is an async function from a DNS
name (``sel._domainkey.example.fr``, no trailing dot) to the text of its TXT
record, the character-strings of the record joined without separator
(RFC 6376 3.6.2.2), or None when the name or the record does not exist
(NXDOMAIN, NODATA: the verifier reports ``permerror``).  A transient failure
(SERVFAIL, timeout, no server reachable) must raise :class:`DnsTempError`
(``temperror``); the verifier also bounds each query with its own
``dns_timeout``.  With dnspython's ``dns.asyncresolver`` that is roughly::

    async def resolve(name: str) -> str | None:
        try:
            answer = await dns.asyncresolver.resolve(name, "TXT", lifetime=5)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            raise DnsTempError(str(exc)) from exc
        return b"".join(answer[0].strings).decode("ascii", "replace")

(A name with several TXT records should return the first one that parses;
RFC 6376 3.6.2.2 leaves the choice to the verifier.)  :class:`StaticResolver`
serves records from memory, with failure switches, for tests.

**Signing** (RFC 6376 5) of our own outbound mail: :class:`DkimSigner` makes
the ``DKIM-Signature`` header field to prepend, ``ed25519-sha256``
(RFC 8463) or ``rsa-sha256``, relaxed/relaxed, in a worker thread so that a
signature never blocks the event loop; :meth:`DkimSigner.dns_record` gives
the TXT record to publish and :func:`generate_key` makes a key.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import io
import logging
import re
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final, Literal, TypeAlias

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from mssante.clock import Clock, SystemClock
from mssante.durable import write_file

_log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SIGNED_HEADERS",
    "MAX_HEADER_BYTES",
    "DkimResult",
    "DkimSigner",
    "DkimVerifier",
    "DnsTempError",
    "Resolver",
    "ResultKeyword",
    "SigningAlgorithm",
    "StaticResolver",
    "generate_key",
]

Resolver: TypeAlias = Callable[[str], Awaitable[str | None]]
"""DNS name -> TXT record text (strings joined), or None; raises DnsTempError."""

ResultKeyword: TypeAlias = Literal[
    "pass", "fail", "policy", "neutral", "temperror", "permerror", "none"
]
"""The RFC 8601 2.7.1 result keywords of the ``dkim`` method."""

SigningAlgorithm: TypeAlias = Literal["ed25519-sha256", "rsa-sha256"]

MAX_HEADER_BYTES: Final = 1 << 20
"""Largest header block read (as in mssante.store.mime); beyond it: ``neutral``."""

DEFAULT_SIGNED_HEADERS: Final[tuple[str, ...]] = (
    "From",
    "Sender",
    "Reply-To",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Auto-Submitted",
)
"""What :class:`DkimSigner` signs by default (RFC 6376 5.4.1 and the fields that
carry meaning for a reader: threading, MIME, auto-reply suppression)."""

_CHUNK: Final = 64 << 10  # octets read at a time
_EMPTY_LINES_AT_ONCE: Final = 32 << 10  # held-back empty lines emitted per piece
_MIN_RSA_BITS: Final = 1024  # RFC 8301 3.2
_MAX_RSA_BITS: Final = 8192  # RFC 8301 3.2: verifiers MAY refuse keys over 4096 bits
_MAX_REASON: Final = 120  # characters of a reason written in Authentication-Results
_FOLD_AT: Final = 78  # RFC 5322 2.1.1: lines SHOULD be at most 78 characters

_WSP_RUN: Final = re.compile(rb"[ \t]+")
_TRAILING_WSP: Final = re.compile(rb"[ \t]+\r\n")
_WSP_TO_SPACE: Final = re.compile(rb" [ \t]+|\t[ \t]*")  # WSP runs other than one SP
_FWS: Final = b" \t\r\n"
_FIELD_RE: Final = re.compile(rb"[!-9;-~]+[ \t]*:")
_FIELD_NAME_RE: Final = re.compile(r"[!-9;-~]+")
_TAG_NAME_RE: Final = re.compile(rb"[A-Za-z][A-Za-z0-9_]*")
_TAG_VALUE_RE: Final = re.compile(rb"(?:[!-:<-~]+(?:[ \t\r\n]+[!-:<-~]+)*)?")
_BASE64_RE: Final = re.compile(rb"[A-Za-z0-9+/]*={0,2}")
_LABEL: Final = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN_RE: Final = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_SELECTOR_LABEL: Final = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_SELECTOR_RE: Final = re.compile(rf"{_SELECTOR_LABEL}(?:\.{_SELECTOR_LABEL})*")
_DIGITS_RE: Final = re.compile(r"[0-9]+")
_TOKEN_RE: Final = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")  # RFC 2045 token

# RFC 5322 3.6: fields that occur at most once.  A signer lists each as many
# times as it signs instances; an unsigned extra instance (typically a second
# From prepended by a forger, RFC 6376 8.15) makes the result "policy".
_SINGLETONS: Final = frozenset(
    {
        b"date",
        b"from",
        b"sender",
        b"reply-to",
        b"to",
        b"cc",
        b"bcc",
        b"message-id",
        b"in-reply-to",
        b"references",
        b"subject",
    }
)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class DkimResult:
    """The outcome of one DKIM-Signature (RFC 8601 2.7.1).

    ``domain`` (``d=``, lower case) and ``selector`` (``s=``) are set only when
    the signature carried syntactically valid values; ``none`` has neither.

    ``result`` is one of:

    - ``pass``: the signature verified;
    - ``fail``: the body hash or the header signature did not verify;
    - ``policy``: the signature is not acceptable to us although it may
      verify: ``rsa-sha1`` or an RSA key under 1024 bits (RFC 8301), an
      expired ``x=``, an ``l=`` leaving part of the body unsigned
      (RFC 6376 8.2), an unsigned extra instance of a singleton header field
      such as From (RFC 6376 8.15);
    - ``neutral``: syntax errors in the signature, or a header block too large
      to process;
    - ``temperror``: the key could not be fetched now (DNS);
    - ``permerror``: the signature cannot be verified: no key record, key
      revoked or malformed, unsupported algorithm, From not signed, ``i=``
      outside ``d=``...;
    - ``none``: the message carries no DKIM-Signature.
    """

    domain: str | None
    selector: str | None
    result: ResultKeyword
    reason: str


class DnsTempError(Exception):
    """A transient DNS failure: the result is ``temperror`` (RFC 6376 6.1.2)."""


# --------------------------------------------------------------------------- resolvers


def _dns_key(name: str) -> str:
    return name.lower().rstrip(".")


class StaticResolver:
    """Key records served from memory: tests, and deployments without DNS.

    Failure switches: names in :attr:`temp_fail` raise :class:`DnsTempError`
    (the switch can be flipped during a test); every query is appended to
    :attr:`queries`.  Names are compared case-insensitively, trailing dot
    ignored.
    """

    def __init__(self, records: Mapping[str, str], *, temp_fail: Collection[str] = ()) -> None:
        self.records: dict[str, str] = {_dns_key(k): v for k, v in records.items()}
        self.temp_fail: set[str] = {_dns_key(n) for n in temp_fail}
        self.queries: list[str] = []

    async def __call__(self, name: str) -> str | None:
        self.queries.append(name)
        key = _dns_key(name)
        if key in self.temp_fail:
            raise DnsTempError(f"temporary failure resolving {name}")
        return self.records.get(key)


# --------------------------------------------------------------------------- message parsing


class _Reader:
    """Reads a message through ``read()`` only (works with raw, short-reading
    streams such as the store's decryptor), a line or a chunk at a time."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._buf = b""
        self._pos = 0
        self._eof = False

    def _fill(self) -> bool:
        if self._eof:
            return False
        chunk = self._stream.read(_CHUNK)
        if not chunk:
            self._eof = True
            return False
        self._buf = self._buf[self._pos :] + chunk
        self._pos = 0
        return True

    def readline(self, limit: int) -> bytes:
        """The next line with its LF; shorter at EOF; or more than ``limit``
        octets without LF when the line is that long."""
        while True:
            nl = self._buf.find(b"\n", self._pos)
            if nl >= 0:
                line = self._buf[self._pos : nl + 1]
                self._pos = nl + 1
                return line
            if len(self._buf) - self._pos > limit or not self._fill():
                line = self._buf[self._pos :]
                self._buf, self._pos = b"", 0
                return line

    def unread(self, data: bytes) -> None:
        self._buf = data + self._buf[self._pos :]
        self._pos = 0

    def chunks(self) -> Iterator[bytes]:
        """The rest of the stream."""
        if self._pos < len(self._buf):
            yield self._buf[self._pos :]
        self._buf, self._pos = b"", 0
        while not self._eof:
            chunk = self._stream.read(_CHUNK)
            if not chunk:
                self._eof = True
            else:
                yield chunk


@dataclass(frozen=True, slots=True)
class _Field:
    """One header field, line ends normalised to CRLF (as dkimpy and SMTP do)."""

    raw: bytes
    """The whole field, name to final CRLF."""

    @property
    def name(self) -> bytes:
        """Lower-case name, for look-ups."""
        return self.raw.partition(b":")[0].rstrip(b" \t").lower()

    @property
    def value(self) -> bytes:
        """After the colon, without the final CRLF."""
        return self.raw.partition(b":")[2][:-2]


@dataclass(frozen=True, slots=True)
class _Header:
    fields: list[_Field]
    too_large: bool


def _read_header(reader: _Reader, limit: int = MAX_HEADER_BYTES) -> _Header:
    """Read the header block up to the empty line (RFC 5322 2.1).

    A line that is neither a field nor a continuation ends the block and is
    left for the body, as in mssante.store.mime.
    """
    fields: list[_Field] = []
    current: list[bytes] = []
    total = 0

    def close_field() -> None:
        if current:
            fields.append(_Field(b"\r\n".join(current) + b"\r\n"))
            current.clear()

    while True:
        line = reader.readline(limit - total)
        total += len(line)
        if total > limit:
            return _Header(fields, too_large=True)
        if not line:
            break
        content = line
        if content.endswith(b"\n"):
            content = content[:-1].removesuffix(b"\r")
            if not content:
                break  # the empty line: the body follows
        if content[:1] in (b" ", b"\t") and current:
            current.append(content)
        elif _FIELD_RE.match(content):
            close_field()
            current.append(content)
        else:
            reader.unread(line)
            break
    close_field()
    return _Header(fields, too_large=False)


# --------------------------------------------------------------------------- canonicalisation


class _BodyCanon:
    """Streaming body canonicalisation, RFC 6376 3.4.3 (simple) and 3.4.4
    (relaxed).  Line ends are normalised to CRLF first, like SMTP and dkimpy.

    Empty lines are held back until a non-empty line follows: those that end
    the body are ignored (both algorithms).  Memory is bounded by the chunk.
    """

    def __init__(self, *, relaxed: bool, sink: Callable[[bytes], None]) -> None:
        self._relaxed = relaxed
        self._sink = sink
        self._partial = b""
        self._held = 0
        self._nonempty = False

    def feed(self, data: bytes) -> None:
        data = self._partial + data
        cut = data.rfind(b"\n") + 1
        self._partial = data[cut:]
        if cut:
            self._lines(data[:cut])

    def finish(self) -> None:
        if self._partial:
            # RFC 6376 3.4.3 / 3.4.4: a CRLF is added to a last line without one.
            self._lines(self._partial + b"\r\n")
            self._partial = b""
        if not self._nonempty and not self._relaxed:
            # RFC 6376 3.4.3: an empty body is canonicalised as one CRLF;
            # relaxed leaves it empty (RFC 4871 erratum 1376).
            self._sink(b"\r\n")

    def _lines(self, block: bytes) -> None:
        # The regular expressions scan slowly: run each only when needed.
        if block.count(b"\n") != block.count(b"\r\n"):
            block = block.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if self._relaxed:
            # RFC 6376 3.4.4 a: no WSP at line ends, WSP runs become one SP.
            if b" \r\n" in block or b"\t\r\n" in block:
                block = _TRAILING_WSP.sub(b"\r\n", block)
            if b"\t" in block or b"  " in block:
                block = _WSP_TO_SPACE.sub(b" ", block)
        # Every LF now ends a line: the block ends with `held` empty lines
        # when it ends with CRLF preceded by CRLF (or by nothing).
        end = len(block)
        while end >= 2 and (end == 2 or block[end - 4 : end - 2] == b"\r\n"):
            end -= 2
        held = (len(block) - end) // 2
        if end == 0:
            self._held += held
            return
        while self._held:
            n = min(self._held, _EMPTY_LINES_AT_ONCE)
            self._sink(b"\r\n" * n)
            self._held -= n
        self._sink(block[:end] if end < len(block) else block)
        self._held = held
        self._nonempty = True


class _BodyHash:
    """SHA-256 of the first ``limit`` octets of a canonical body (``l=``)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.hash = hashlib.sha256()
        self.length = 0

    def update(self, data: bytes) -> None:
        if self.limit is None:
            self.hash.update(data)
        elif self.length < self.limit:
            self.hash.update(data[: self.limit - self.length])
        self.length += len(data)


def _body_hashes(
    reader: _Reader, wanted: Iterable[tuple[bool, int | None]]
) -> dict[tuple[bool, int | None], _BodyHash]:
    """Read the body once; one hash per (relaxed, l=) pair."""
    hashes_: dict[tuple[bool, int | None], _BodyHash] = {
        key: _BodyHash(key[1]) for key in set(wanted)
    }
    canons: list[_BodyCanon] = []
    for relaxed in (False, True):
        targets = [h for (r, _), h in hashes_.items() if r == relaxed]
        if targets:

            def sink(data: bytes, targets: list[_BodyHash] = targets) -> None:
                for target in targets:
                    target.update(data)

            canons.append(_BodyCanon(relaxed=relaxed, sink=sink))
    if canons:
        for chunk in reader.chunks():
            for canon in canons:
                canon.feed(chunk)
        for canon in canons:
            canon.finish()
    return hashes_


def _canon_header(field: _Field, *, relaxed: bool) -> bytes:
    """RFC 6376 3.4.1 (simple: unchanged) and 3.4.2 (relaxed)."""
    if not relaxed:
        return field.raw
    name, _, value = field.raw.partition(b":")
    value = _WSP_RUN.sub(b" ", value.replace(b"\r\n", b"")).strip(b" ")
    return name.rstrip(b" \t").lower() + b":" + value + b"\r\n"


def _without_b_value(field: _Field) -> _Field:
    """RFC 6376 3.7: the signature field is hashed with the value of its b=
    tag, and the whitespace around that value, deleted."""
    name, _, value = field.raw[:-2].partition(b":")
    specs = value.split(b";")
    for i, spec in enumerate(specs):
        tag, eq, _ = spec.partition(b"=")
        if eq and tag.strip(_FWS) == b"b":
            specs[i] = tag + b"="
    return _Field(name + b":" + b";".join(specs) + b"\r\n")


def _header_hash_input(
    fields: list[_Field],
    signed: Iterable[bytes],
    signature: _Field,
    *,
    relaxed: bool,
) -> bytes:
    """The data signed by b= (RFC 6376 3.7, 5.4.2): the fields named in h=,
    each name taking the next instance from the bottom up (a name with no
    instance left contributes nothing), then the signature field itself,
    with b= empty and without its final CRLF.  The signature being verified
    is never one of the selected fields: it did not exist when it was made."""
    positions: dict[bytes, list[int]] = {}
    for index, field in enumerate(fields):
        if field is not signature:
            positions.setdefault(field.name, []).append(index)
    parts: list[bytes] = []
    for name in signed:
        instances = positions.get(name)
        if instances:
            parts.append(_canon_header(fields[instances.pop()], relaxed=relaxed))
    parts.append(_canon_header(_without_b_value(signature), relaxed=relaxed)[:-2])
    return b"".join(parts)


# --------------------------------------------------------------------------- tag lists


class _TagError(ValueError):
    pass


def _parse_tags(text: bytes) -> dict[str, str]:
    """RFC 6376 3.2 tag=value list.  Duplicate tags invalidate the list."""
    tags: dict[str, str] = {}
    specs = text.split(b";")
    if specs and not specs[-1].strip(_FWS):
        specs.pop()  # a trailing ";" is allowed
    for spec in specs:
        name, eq, value = spec.partition(b"=")
        name, value = name.strip(_FWS), value.strip(_FWS)
        if not eq or not _TAG_NAME_RE.fullmatch(name):
            raise _TagError("malformed tag list")
        if not _TAG_VALUE_RE.fullmatch(value):
            raise _TagError(f"malformed {name.decode()}= value")
        key = name.decode("ascii")
        if key in tags:
            raise _TagError(f"duplicate {key}= tag")
        tags[key] = value.decode("ascii")
    return tags


def _unfold(value: str) -> str:
    return "".join(value.split())


def _base64(value: str) -> bytes | None:
    data = _unfold(value).encode("ascii")
    if len(data) % 4 or not _BASE64_RE.fullmatch(data):
        return None
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error:
        return None


def _colon_list(value: str) -> list[str]:
    return [item.strip(" \t\r\n") for item in value.split(":")]


def _domain(value: str | None) -> str | None:
    if value is None or len(value) > 253 or not _DOMAIN_RE.fullmatch(value):
        return None
    return value.lower()


def _selector(value: str | None) -> str | None:
    if value is None or len(value) > 253 or not _SELECTOR_RE.fullmatch(value):
        return None
    return value.lower()


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True, slots=True)
class _Signature:
    """A DKIM-Signature whose tags passed RFC 6376 6.1.1."""

    field: _Field
    algorithm: SigningAlgorithm
    relaxed_header: bool
    relaxed_body: bool
    domain: str
    selector: str
    identity_domain: str | None
    signed: tuple[bytes, ...]
    body_hash: bytes
    signature: bytes
    length: int | None

    @property
    def key_name(self) -> str:
        # RFC 6376 3.6.2.1
        return f"{self.selector}._domainkey.{self.domain}"

    def result(self, result: ResultKeyword, reason: str) -> DkimResult:
        return DkimResult(self.domain, self.selector, result, reason)


_PublicKey: TypeAlias = rsa.RSAPublicKey | ed25519.Ed25519PublicKey
_Fetched: TypeAlias = str | DnsTempError | None


class DkimVerifier:
    """Verifies the DKIM signatures of received messages (RFC 6376 6).

    ``resolver`` fetches key records (see the module documentation);
    ``authserv_id`` names us in Authentication-Results (RFC 8601 2.5);
    ``required_domains`` are the sender domains whose mail must carry a valid
    signature of their own (:meth:`policy_allows`).  ``clock`` judges ``x=``
    expiry; ``dns_timeout`` bounds each key query (seconds).
    """

    def __init__(
        self,
        resolver: Resolver,
        *,
        authserv_id: str,
        required_domains: frozenset[str] = frozenset(),
        clock: Clock | None = None,
        dns_timeout: float = 5.0,
    ) -> None:
        if not _TOKEN_RE.fullmatch(authserv_id):
            raise ValueError(f"authserv_id is not an RFC 8601 token: {authserv_id!r}")
        self._resolver = resolver
        self._authserv_id = authserv_id
        self._required = frozenset(_dns_key(d) for d in required_domains)
        self._clock: Clock = clock or SystemClock()
        self._dns_timeout = dns_timeout

    async def verify(
        self, message: BinaryIO | bytes, *, max_signatures: int = 5
    ) -> list[DkimResult]:
        """One result per DKIM-Signature, topmost first, at most
        ``max_signatures`` of them (RFC 6376 6.1: verifiers may limit the
        number of signatures they try; the others are ignored).  A message
        without a signature gives ``[none]``.

        A file is read from its current position to its end, in worker
        threads, through ``read()`` only; memory stays bounded by the header
        block and a 64 KB chunk.  The caller must not use the file until this
        returns.  Errors reading it propagate; DNS and signature problems are
        results, never exceptions.
        """
        if max_signatures < 1:
            raise ValueError("max_signatures must be at least 1")
        stream = io.BytesIO(message) if isinstance(message, bytes) else message
        reader = _Reader(stream)
        header = await asyncio.to_thread(_read_header, reader)
        if header.too_large:
            return [
                DkimResult(None, None, "neutral", f"header block over {MAX_HEADER_BYTES} octets")
            ]
        fields = [f for f in header.fields if f.name == b"dkim-signature"][:max_signatures]
        if not fields:
            return [DkimResult(None, None, "none", "no DKIM-Signature header field")]
        checked = [self._check_tags(field) for field in fields]
        names = sorted({c.key_name for c in checked if isinstance(c, _Signature)})
        records = await asyncio.gather(*(self._fetch(name) for name in names))
        fetched = dict(zip(names, records, strict=True))
        return await asyncio.to_thread(self._finish, reader, header.fields, checked, fetched)

    async def _fetch(self, name: str) -> _Fetched:
        try:
            async with asyncio.timeout(self._dns_timeout):
                return await self._resolver(name)
        except DnsTempError as exc:
            return exc
        except TimeoutError:
            return DnsTempError(f"no answer for {name} in {self._dns_timeout:g} s")

    def _check_tags(self, field: _Field) -> _Signature | DkimResult:
        """RFC 6376 6.1.1: validate the signature header field."""
        try:
            tags = _parse_tags(field.value)
        except _TagError as exc:
            return DkimResult(None, None, "neutral", f"signature syntax: {exc}")
        domain, selector = _domain(tags.get("d")), _selector(tags.get("s"))

        def result(kind: ResultKeyword, reason: str) -> DkimResult:
            return DkimResult(domain, selector, kind, reason)

        missing = [t for t in ("v", "a", "b", "bh", "d", "h", "s") if t not in tags]
        if missing:
            return result("neutral", "missing " + ", ".join(f"{t}=" for t in missing))
        if tags["v"] != "1":
            return result("permerror", "unsupported version v=")
        if domain is None:
            return result("neutral", "invalid d= domain")
        if selector is None:
            return result("neutral", "invalid s= selector")
        algorithm = tags["a"].lower()
        if algorithm == "rsa-sha1":
            return result("policy", "rsa-sha1 is not acceptable (RFC 8301 3.1)")
        if algorithm not in ("rsa-sha256", "ed25519-sha256"):
            return result("permerror", "unsupported algorithm a=")
        canon = [c.strip().lower() for c in tags.get("c", "simple").split("/")]
        if len(canon) == 1:
            canon.append("simple")  # RFC 6376 3.5 c=: the body algorithm defaults
        if len(canon) != 2 or not set(canon) <= {"simple", "relaxed"}:
            return result("permerror", "unsupported canonicalization c=")
        signature, body_hash = _base64(tags["b"]), _base64(tags["bh"])
        if not signature or body_hash is None:
            return result("neutral", "invalid base64 in b= or bh=")
        signed = _colon_list(tags["h"])
        if not all(_FIELD_NAME_RE.fullmatch(n) for n in signed):
            return result("neutral", "invalid h= list")
        names = tuple(n.lower().encode("ascii") for n in signed)
        if b"from" not in names:
            # RFC 6376 6.1.1: the From header field MUST be signed.
            return result("permerror", "From is not signed")
        identity_domain = None
        if "i" in tags:
            _, at, idomain = tags["i"].rpartition("@")
            identity_domain = _domain(idomain)
            if not at or identity_domain is None:
                return result("neutral", "invalid i= identity")
            if identity_domain != domain and not identity_domain.endswith("." + domain):
                return result("permerror", "i= is not within d= (RFC 6376 6.1.1)")
        length = None
        if "l" in tags:
            if not _DIGITS_RE.fullmatch(tags["l"]) or len(tags["l"]) > 76:
                return result("neutral", "invalid l= length")
            length = int(tags["l"])
        if "q" in tags and "dns/txt" not in [q.lower() for q in _colon_list(tags["q"])]:
            return result("permerror", "unsupported query method q=")
        times = {t: tags[t] for t in ("t", "x") if t in tags}
        if not all(_DIGITS_RE.fullmatch(v) and len(v) <= 12 for v in times.values()):
            return result("neutral", "invalid t= or x= timestamp")
        if "x" in times:
            expires = int(times["x"])
            if "t" in times and expires <= int(times["t"]):
                return result("permerror", "x= is not after t= (RFC 6376 3.5)")
            if expires < self._clock.now().timestamp():
                return result("policy", "signature expired (x=)")
        return _Signature(
            field=field,
            algorithm="rsa-sha256" if algorithm == "rsa-sha256" else "ed25519-sha256",
            relaxed_header=canon[0] == "relaxed",
            relaxed_body=canon[1] == "relaxed",
            domain=domain,
            selector=selector,
            identity_domain=identity_domain,
            signed=names,
            body_hash=body_hash,
            signature=signature,
            length=length,
        )

    def _finish(
        self,
        reader: _Reader,
        fields: list[_Field],
        checked: list[_Signature | DkimResult],
        fetched: dict[str, _Fetched],
    ) -> list[DkimResult]:
        """In a worker thread: keys, body hashes, header signatures."""
        results: list[DkimResult | None] = []
        pending: list[tuple[int, _Signature, _PublicKey]] = []
        for item in checked:
            key = item if isinstance(item, DkimResult) else _key(item, fetched)
            if isinstance(key, DkimResult):
                results.append(key)
            elif isinstance(item, _Signature):
                pending.append((len(results), item, key))
                results.append(None)
        bodies = _body_hashes(reader, ((sig.relaxed_body, sig.length) for _, sig, _ in pending))
        for index, sig, key in pending:
            results[index] = _verify(sig, key, fields, bodies[(sig.relaxed_body, sig.length)])
        return [r for r in results if r is not None]

    def authentication_results(self, results: list[DkimResult]) -> bytes:
        """The Authentication-Results header field (RFC 8601 2.2) for these
        results, kept beside the message and prepended when it is read.

        One ``dkim=`` resinfo per result, each on its own folded line, with
        ``reason=`` for anything but pass and none (RFC 8601 2.2) and the
        ``header.d`` / ``header.s`` properties (RFC 8601 2.7.1); ``dkim=none``
        when there is nothing.  ASCII, lines of at most 78 characters unless a
        single token is longer, CRLF-terminated.

        Readers must ignore Authentication-Results fields that arrived in the
        message with our authserv-id (RFC 8601 5): only the one kept beside
        the message is ours.
        """
        entries = results or [DkimResult(None, None, "none", "")]
        lines = [f"Authentication-Results: {self._authserv_id};"]
        for index, entry in enumerate(entries):
            tokens = [f"dkim={entry.result}"]
            if entry.result not in ("pass", "none") and entry.reason:
                tokens.append(f"reason={_quoted(entry.reason[:_MAX_REASON])}")
            if entry.domain:
                tokens.append(f"header.d={_pvalue(entry.domain)}")
            if entry.selector:
                tokens.append(f"header.s={_pvalue(entry.selector)}")
            if index < len(entries) - 1:
                tokens[-1] += ";"
            line = "\t" + tokens[0]
            for token in tokens[1:]:
                if len(line) + 1 + len(token) > _FOLD_AT:
                    lines.append(line)
                    line = "\t" + token
                else:
                    line += " " + token
            lines.append(line)
        return ("\r\n".join(lines) + "\r\n").encode("ascii")

    def policy_allows(self, sender_domain: str, results: list[DkimResult]) -> bool:
        """False when ``sender_domain`` is one of ``required_domains`` and no
        result is a pass signed by that very domain.

        Equality is strict (case and a trailing dot aside): a signature by a
        parent domain or a subdomain does not count, unlike DMARC's relaxed
        alignment (RFC 7489 3.1.1), so a required domain states exactly which
        key must sign.  Domains are compared as written (A-labels expected).
        """
        domain = _dns_key(sender_domain)
        if domain not in self._required:
            return True
        return any(r.result == "pass" and r.domain == domain for r in results)


def _key(sig: _Signature, fetched: Mapping[str, _Fetched]) -> _PublicKey | DkimResult:
    """RFC 6376 6.1.2: get the public key from its record."""
    record = fetched[sig.key_name]
    if isinstance(record, DnsTempError):
        return sig.result("temperror", f"key query failed: {record}")
    if record is None:
        return sig.result("permerror", f"no key record at {sig.key_name}")
    try:
        tags = _parse_tags(record.encode("ascii"))
    except (UnicodeEncodeError, _TagError):
        return sig.result("permerror", "malformed key record")
    if tags.get("v", "DKIM1") != "DKIM1":
        return sig.result("permerror", "key record v= is not DKIM1")
    if "h" in tags and "sha256" not in [h.lower() for h in _colon_list(tags["h"])]:
        return sig.result("permerror", "key does not allow sha256 (h=)")
    if "s" in tags and not {"*", "email"} & {s.lower() for s in _colon_list(tags["s"])}:
        return sig.result("permerror", "key is not for email (s=)")
    flags = {f.lower() for f in _colon_list(tags.get("t", ""))}
    if "s" in flags and sig.identity_domain not in (None, sig.domain):
        return sig.result("permerror", "key forbids subdomains in i= (t=s)")
    if "p" not in tags:
        return sig.result("permerror", "key record without p=")
    if not _unfold(tags["p"]):
        return sig.result("permerror", "key revoked (empty p=)")
    data = _base64(tags["p"])
    if data is None:
        return sig.result("permerror", "invalid base64 in key p=")
    kind = tags.get("k", "rsa").lower()
    if kind not in ("rsa", "ed25519"):
        return sig.result("permerror", "unsupported key type k=")
    if kind != sig.algorithm.partition("-")[0]:
        return sig.result("permerror", f"k={kind} key for a={sig.algorithm}")
    if kind == "ed25519":
        # RFC 8463 4: the raw 32-octet public key.
        try:
            return ed25519.Ed25519PublicKey.from_public_bytes(data)
        except ValueError:
            return sig.result("permerror", "malformed ed25519 key")
    try:
        # SubjectPublicKeyInfo as published in practice, or the PKCS#1
        # RSAPublicKey that RFC 6376 3.6.1 literally names.
        key = serialization.load_der_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return sig.result("permerror", "malformed rsa key")
    if not isinstance(key, rsa.RSAPublicKey):
        return sig.result("permerror", "k=rsa record holds another key type")
    if key.key_size < _MIN_RSA_BITS:
        return sig.result("policy", f"rsa key of {key.key_size} bits (RFC 8301 3.2)")
    if key.key_size > _MAX_RSA_BITS:
        return sig.result("permerror", f"rsa key of {key.key_size} bits is too large")
    return key


def _verify(sig: _Signature, key: _PublicKey, fields: list[_Field], body: _BodyHash) -> DkimResult:
    """RFC 6376 6.1.3: compare the body hash, then check the header signature."""
    if sig.length is not None and body.length < sig.length:
        return sig.result("fail", "body shorter than l=")
    if body.hash.digest() != sig.body_hash:
        return sig.result("fail", "body hash mismatch")
    data = _header_hash_input(fields, sig.signed, sig.field, relaxed=sig.relaxed_header)
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(sig.signature, data, padding.PKCS1v15(), hashes.SHA256())
        else:
            # RFC 8463 3: Ed25519 signs the SHA-256 hash of the header data.
            key.verify(sig.signature, hashlib.sha256(data).digest())
    except InvalidSignature:
        return sig.result("fail", "signature did not verify")
    present: dict[bytes, int] = {}
    for field in fields:
        present[field.name] = present.get(field.name, 0) + 1
    for name in sorted(_SINGLETONS & set(sig.signed)):
        if present.get(name, 0) > sig.signed.count(name):
            return sig.result("policy", f"unsigned extra {name.decode()} field (RFC 6376 8.15)")
    if sig.length is not None and body.length > sig.length:
        return sig.result("policy", "l= leaves part of the body unsigned (RFC 6376 8.2)")
    return sig.result("pass", "good signature")


def _quoted(text: str) -> str:
    """An RFC 5322 quoted-string of printable ASCII."""
    clean = "".join(c if " " <= c <= "~" else "?" for c in text)
    return '"' + clean.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _pvalue(text: str) -> str:
    return text if _TOKEN_RE.fullmatch(text) else _quoted(text)


# --------------------------------------------------------------------------- signing


class DkimSigner:
    """Signs our own outbound mail (RFC 6376 5), relaxed/relaxed.

    ``private_key_pem`` is an unencrypted PEM key (PKCS#8, or PKCS#1 for
    RSA); the algorithm follows from it (``ed25519-sha256``, RFC 8463, or
    ``rsa-sha256`` with at least 1024 bits, 2048 recommended: RFC 8301 3.2).
    ``headers`` are the field names to sign; each is listed once per instance
    present plus once more, so that no instance can be added without breaking
    the signature (RFC 6376 5.4.2, 8.15).  ``clock`` gives ``t=``.

    No ``l=`` (RFC 6376 8.2), no ``x=``, no ``i=`` (it defaults to ``@d``).
    """

    def __init__(
        self,
        *,
        domain: str,
        selector: str,
        private_key_pem: bytes,
        algorithm: SigningAlgorithm | None = None,
        headers: tuple[str, ...] = DEFAULT_SIGNED_HEADERS,
        clock: Clock | None = None,
    ) -> None:
        checked_domain, checked_selector = _domain(domain), _selector(selector)
        if checked_domain is None:
            raise ValueError(f"not a domain name: {domain!r}")
        if checked_selector is None:
            raise ValueError(f"not a selector: {selector!r}")
        loaded = serialization.load_pem_private_key(private_key_pem, password=None)
        key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
        detected: SigningAlgorithm
        if isinstance(loaded, ed25519.Ed25519PrivateKey):
            key = loaded
            detected = "ed25519-sha256"
        elif isinstance(loaded, rsa.RSAPrivateKey):
            key = loaded
            detected = "rsa-sha256"
            if key.key_size < _MIN_RSA_BITS:
                raise ValueError(f"RSA key of {key.key_size} bits: RFC 8301 3.2 requires 1024")
        else:
            raise ValueError("the key is neither Ed25519 nor RSA")
        if algorithm is not None and algorithm != detected:
            raise ValueError(f"{algorithm} requested with a {detected} key")
        names: list[bytes] = []
        for header in headers:
            if not _FIELD_NAME_RE.fullmatch(header):
                raise ValueError(f"not a header field name: {header!r}")
            name = header.lower().encode("ascii")
            if name == b"dkim-signature":
                raise ValueError("DKIM-Signature cannot be signed")
            if name not in names:
                names.append(name)
        if b"from" not in names:
            raise ValueError("From must be signed (RFC 6376 5.4)")
        self._key = key
        self._domain = checked_domain
        self._selector = checked_selector
        self._headers = tuple(names)
        self._clock: Clock = clock or SystemClock()
        self.algorithm: SigningAlgorithm = detected

    async def sign(self, message: bytes | BinaryIO) -> bytes:
        """The ``DKIM-Signature: ...\\r\\n`` field to prepend to ``message``.

        ``message`` is the message as it will be sent (bare LF counts as
        CRLF, as SMTP will send it); a file is read from its current position.
        The work runs in a worker thread: RSA never blocks the event loop.
        Raises ValueError for a message without From or with a header block
        over :data:`MAX_HEADER_BYTES`.
        """
        timestamp = int(self._clock.now().timestamp())
        return await asyncio.to_thread(self._sign, message, timestamp)

    def _sign(self, message: bytes | BinaryIO, timestamp: int) -> bytes:
        reader = _Reader(io.BytesIO(message) if isinstance(message, bytes) else message)
        header = _read_header(reader)
        if header.too_large:
            raise ValueError(f"header block over {MAX_HEADER_BYTES} octets")
        if not any(field.name == b"from" for field in header.fields):
            raise ValueError("the message has no From header field (RFC 5322 3.6)")
        body = _body_hashes(reader, [(True, None)])[(True, None)]
        counts: dict[bytes, int] = {}
        for field in header.fields:
            counts[field.name] = counts.get(field.name, 0) + 1
        signed = [n for n in self._headers for _ in range(counts.get(n, 0) + 1)]
        lines = [
            f"DKIM-Signature: v=1; a={self.algorithm}; c=relaxed/relaxed;",
            f"\td={self._domain}; s={self._selector}; t={timestamp};",
        ]
        line = "\th="
        for index, name in enumerate(signed):
            token = name.decode("ascii") + (":" if index < len(signed) - 1 else ";")
            if len(line) + len(token) > _FOLD_AT:
                lines.append(line)
                line = "\t"
            line += token
        lines.append(line)
        lines.append(f"\tbh={base64.b64encode(body.hash.digest()).decode('ascii')};")
        lines.append("\tb=")
        unsigned = _Field(("\r\n".join(lines) + "\r\n").encode("ascii"))
        data = _header_hash_input(header.fields, signed, unsigned, relaxed=True)
        if isinstance(self._key, rsa.RSAPrivateKey):
            signature = self._key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        else:
            signature = self._key.sign(hashlib.sha256(data).digest())  # RFC 8463 3
        value = base64.b64encode(signature).decode("ascii")
        # Fold b= (RFC 6376 3.5 allows FWS in it); first piece after "\tb=".
        pieces = [value[:72]] + [value[i : i + 76] for i in range(72, len(value), 76)]
        lines[-1] += "\r\n\t".join(pieces)
        return ("\r\n".join(lines) + "\r\n").encode("ascii")

    def dns_record(self) -> str:
        """The TXT record to publish at ``<selector>._domainkey.<domain>``
        (RFC 6376 3.6.1; RFC 8463 4 for Ed25519).  An RSA record is longer
        than 255 octets: the zone must split it into several character-strings
        of one TXT record, which resolvers join back."""
        public = self._key.public_key()
        if isinstance(public, ed25519.Ed25519PublicKey):
            kind = "ed25519"
            data = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        else:
            kind = "rsa"
            data = public.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        return f"v=DKIM1; k={kind}; p={base64.b64encode(data).decode('ascii')}"

    @property
    def key_name(self) -> str:
        """Where :meth:`dns_record` is published."""
        return f"{self._selector}._domainkey.{self._domain}"


def generate_key(algorithm: SigningAlgorithm) -> bytes:
    """A new unencrypted PKCS#8 PEM private key: Ed25519, or RSA 2048 bits
    (RFC 8301 3.2 recommends at least 2048).  For tests and ``mssante dkim
    keygen``."""
    key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    if algorithm == "ed25519-sha256":
        key = ed25519.Ed25519PrivateKey.generate()
    elif algorithm == "rsa-sha256":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        raise ValueError(f"unknown algorithm {algorithm!r}")
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_signer(
    key_file: Path | None,
    *,
    data_dir: Path,
    selector: str,
    domain: str,
    clock: Clock,
    setting: str,
) -> DkimSigner:
    """The signer of ``key_file``, else of a development Ed25519 key made once
    in ``data_dir/dkim/<selector>.key`` (with the TXT record to publish beside
    it, and a warning naming ``setting``, the key to set in production)."""
    path = key_file
    if path is None:
        path = data_dir / "dkim" / f"{selector}.key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):  # another process made it
                write_file(path, generate_key("ed25519-sha256"), exclusive=True)
        _log.warning("development DKIM key in use (%s): set %s", path, setting)
    signer = DkimSigner(
        domain=domain, selector=selector, private_key_pem=path.read_bytes(), clock=clock
    )
    record = path.with_suffix(".dns.txt")
    if key_file is None and not record.exists():
        record.write_text(f'{signer.key_name}. IN TXT "{signer.dns_record()}"\n', "utf-8")
    return signer
