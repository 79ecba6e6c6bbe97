"""Encryption at rest: master keys, per-patient data keys, message keys.

Three levels of keys (envelope encryption):

- **master keys** (KEK) come from a :class:`KeyProvider` (key files, an
  environment variable; an HSM or KMS can implement the same interface).
  They only ever wrap data keys, so rotating one re-wraps small rows and
  never touches message bodies.
- a **data key** (DEK) per patient, stored wrapped by a master key.
  Destroying it makes everything of that patient unreadable
  (crypto-shredding).
- a **message key** (CEK) per received message encrypts its body and its
  sensitive metadata once; it is stored wrapped under the data key of each
  recipient, so one message to two patients is stored once.

Everything is AES-256-GCM (NIST SP 800-38D) with random 96-bit nonces for
single values.  Bodies use a segmented format so they are encrypted while
they arrive and decrypted as a stream, each 64 KiB segment authenticated on
its own, its position and the end of the stream bound into the nonce (the
STREAM construction of Hoang, Reyhanitabar, Rogaway and Vizár, as in Tink
and age): segments cannot be reordered, dropped or the stream truncated.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mssante.durable import write_file

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
SEGMENT = 64 * 1024
MAGIC = b"MSE1"
_PREFIX_SIZE = 7  # + 4-byte counter + 1-byte last flag = 12-byte nonce
HEADER_SIZE = len(MAGIC) + _PREFIX_SIZE


class DecryptionError(Exception):
    """Ciphertext altered, truncated, or the wrong key."""


@dataclass(frozen=True, slots=True)
class MasterKey:
    id: str
    key: bytes = b""

    def __repr__(self) -> str:  # never print key material
        return f"MasterKey(id={self.id!r})"


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"mssante-master-key-id" + key).hexdigest()[:16]


class KeyProvider(Protocol):
    def current(self) -> MasterKey:
        """The master key new data keys are wrapped with."""
        ...

    def get(self, key_id: str) -> MasterKey:
        """A master key by id (KeyError if unknown)."""
        ...


class StaticKeyProvider:
    """Master keys held in memory: the base of the file and environment providers."""

    def __init__(self, keys: Mapping[str, MasterKey], current_id: str) -> None:
        if current_id not in keys:
            raise KeyError("current master key is not among the keys")
        self._keys = dict(keys)
        self._current = current_id

    def current(self) -> MasterKey:
        return self._keys[self._current]

    def get(self, key_id: str) -> MasterKey:
        return self._keys[key_id]

    @property
    def ids(self) -> list[str]:
        return sorted(self._keys)


def _decode_key(text: str) -> bytes:
    raw = base64.b64decode(text.strip(), validate=True)
    if len(raw) != KEY_SIZE:
        raise ValueError(f"a master key is {KEY_SIZE} bytes, base64-encoded")
    return raw


def new_key_file(directory: Path) -> MasterKey:
    """Create a new master key file ``<id>.key`` (mode 0600) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    raw = secrets.token_bytes(KEY_SIZE)
    mk = MasterKey(key_id(raw), raw)
    write_file(directory / f"{mk.id}.key", base64.b64encode(raw) + b"\n", exclusive=True)
    return mk


def set_current(directory: Path, key_id_: str) -> None:
    write_file(directory / "current", key_id_.encode() + b"\n")


def load_key_provider(
    directory: Path, *, environ: Mapping[str, str] | None = None, create: bool = False
) -> StaticKeyProvider:
    """Master keys from ``directory`` (``<id>.key`` files, ``current`` names the
    active one) and from ``MSSANTE_MASTER_KEY`` (base64; becomes current).

    With ``create`` and no key at all, a first key file is made (development).
    """
    env = os.environ if environ is None else environ
    keys: dict[str, MasterKey] = {}
    if directory.is_dir():
        for path in sorted(directory.glob("*.key")):
            raw = _decode_key(path.read_text())
            keys[key_id(raw)] = MasterKey(key_id(raw), raw)
    current: str | None = None
    if env.get("MSSANTE_MASTER_KEY"):
        raw = _decode_key(env["MSSANTE_MASTER_KEY"])
        current = key_id(raw)
        keys[current] = MasterKey(current, raw)
    elif (directory / "current").exists():
        current = (directory / "current").read_text().strip()
    elif len(keys) == 1:
        current = next(iter(keys))
    if not keys and create:
        mk = new_key_file(directory)
        set_current(directory, mk.id)
        keys[mk.id], current = mk, mk.id
    if not keys or current is None:
        raise KeyError(f"no master key: put one in {directory} or MSSANTE_MASTER_KEY")
    return StaticKeyProvider(keys, current)


class DirectoryKeyProvider:
    """The master keys of a running service: ``store.keys_dir`` (and
    ``MSSANTE_MASTER_KEY``), read again when a key it does not hold is asked
    for, and on :meth:`reload` (SIGHUP).

    ``mssante keys rotate`` runs in another process: it adds a key file,
    makes it current and re-wraps the data keys under it.  A node started
    before would fail on every data key re-wrapped under the new key (451
    for its patients) if it never looked at the directory again; it finds
    the new key on the first miss.  It wraps new data keys under the new
    current key once reloaded (the README's rotation steps).
    """

    def __init__(
        self, directory: Path, *, environ: Mapping[str, str] | None = None, create: bool = False
    ) -> None:
        self._directory = directory
        self._environ = environ
        self._keys = load_key_provider(directory, environ=environ, create=create)

    def current(self) -> MasterKey:
        return self._keys.current()

    def get(self, key_id: str) -> MasterKey:
        try:
            return self._keys.get(key_id)
        except KeyError:
            self.reload()  # a rotation elsewhere; still KeyError if really unknown
            return self._keys.get(key_id)

    def reload(self) -> None:
        """Read the directory again (raises if it no longer holds usable keys:
        the keys in memory are then kept)."""
        self._keys = load_key_provider(self._directory, environ=self._environ)

    @property
    def ids(self) -> list[str]:
        return self._keys.ids


# --- single values ---------------------------------------------------------------------


def seal(key: bytes, plaintext: bytes, context: bytes) -> bytes:
    """nonce || AES-GCM(key, plaintext, aad=context)."""
    nonce = os.urandom(NONCE_SIZE)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, context)


def unseal(key: bytes, sealed: bytes, context: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], context)
    except (InvalidTag, ValueError) as exc:
        raise DecryptionError("sealed value does not authenticate") from exc


def new_key() -> bytes:
    return secrets.token_bytes(KEY_SIZE)


# --- streams ------------------------------------------------------------------------------


def _nonce(prefix: bytes, counter: int, last: bool) -> bytes:
    return prefix + counter.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


class StreamEncryptor:
    """Encrypts a byte stream into ``sink`` in authenticated 64 KiB segments."""

    def __init__(self, key: bytes, sink: BinaryIO) -> None:
        self._aead = AESGCM(key)
        self._sink = sink
        self._prefix = os.urandom(_PREFIX_SIZE)
        self._header = MAGIC + self._prefix
        self._buffer = bytearray()
        self._counter = 0
        sink.write(self._header)

    def write(self, data: bytes | memoryview) -> None:
        self._buffer += data
        # Keep at least one byte back: the last segment must be flagged as such.
        while len(self._buffer) > SEGMENT:
            self._emit(bytes(self._buffer[:SEGMENT]), last=False)
            del self._buffer[:SEGMENT]

    def finish(self) -> None:
        self._emit(bytes(self._buffer), last=True)
        self._buffer.clear()

    def _emit(self, segment: bytes, *, last: bool) -> None:
        if self._counter >= 2**32 - 1:
            raise OverflowError("stream too long")
        nonce = _nonce(self._prefix, self._counter, last)
        self._sink.write(self._aead.encrypt(nonce, segment, self._header))
        self._counter += 1


class StreamDecryptor(io.RawIOBase):
    """A readable file of the plaintext; raises DecryptionError on any tampering."""

    def __init__(self, key: bytes, source: BinaryIO) -> None:
        super().__init__()
        self._aead = AESGCM(key)
        self._source = source
        header = source.read(HEADER_SIZE)
        if len(header) != HEADER_SIZE or not header.startswith(MAGIC):
            raise DecryptionError("not an encrypted blob")
        self._header = header
        self._prefix = header[len(MAGIC) :]
        self._counter = 0
        self._pending = b""
        self._done = False
        self._next = source.read(SEGMENT + TAG_SIZE)

    def readable(self) -> bool:
        return True

    def _advance(self) -> None:
        current = self._next
        self._next = self._source.read(SEGMENT + TAG_SIZE)
        last = not self._next
        try:
            self._pending = self._aead.decrypt(
                _nonce(self._prefix, self._counter, last), current, self._header
            )
        except (InvalidTag, ValueError) as exc:
            raise DecryptionError(f"segment {self._counter} does not authenticate") from exc
        self._counter += 1
        self._done = last

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        while not self._pending and not self._done:
            self._advance()
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._source.close()
        super().close()


def encrypted_size(plain_size: int) -> int:
    segments = max(1, -(-plain_size // SEGMENT))
    return HEADER_SIZE + plain_size + segments * TAG_SIZE


def decrypt_all(key: bytes, source: BinaryIO) -> bytes:
    with io.BufferedReader(StreamDecryptor(key, source), buffer_size=SEGMENT) as reader:
        return reader.read()
