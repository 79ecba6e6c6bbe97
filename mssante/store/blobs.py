"""Message bodies on the filesystem, encrypted, written so that a commit means "on disk".

A message arrives into a *spool* file while DATA is read (never wholly in
memory), encrypted as it arrives under its own message key (crypto.py): no
plaintext ever touches the disk.  :meth:`BlobStore.commit` then fsyncs it, renames it into a fan-out
directory (``blobs/ab/cd/<key>``) and fsyncs the directories touched, so the
rename itself is durable (POSIX: a rename is only persistent once its
directory is synced).  Only then does the database transaction that points
to the blob commit; a crash in between leaves an orphan blob, never a
database row without its blob.

The interface is narrow (spool, commit, open, delete) so that an
S3-compatible store can take its place.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
from pathlib import Path
from typing import BinaryIO

from mssante.store.crypto import SEGMENT, StreamDecryptor, StreamEncryptor


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """A message being received: bytes are hashed and encrypted into a temp file."""

    def __init__(self, path: Path, key: bytes) -> None:
        self.path = path
        self.key = key
        self._file: BinaryIO = open(path, "xb")  # noqa: SIM115 - closed by finish()/discard()
        self._encryptor = StreamEncryptor(key, self._file)
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self._encryptor.write(data)
        self._hash.update(data)
        self.size += len(data)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def finish(self) -> None:
        """Flush and fsync (once); blocking, call from a worker thread."""
        if self._file.closed:
            return
        self._encryptor.finish()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def open_plain(self) -> BinaryIO:
        """Read back what was received (after :meth:`finish`), decrypting."""
        return io.BufferedReader(
            StreamDecryptor(self.key, open(self.path, "rb")),
            buffer_size=SEGMENT,
        )

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)


class BlobStore:
    def __init__(self, root: Path, *, worker: int = 0) -> None:
        self.root = root
        # One spool per gateway process (serve with several workers): a
        # process starting cleans its own, never a running neighbour's.
        self.spool_dir = root / "spool" / f"worker-{worker}"
        self.blob_dir = root / "blobs"

    def prepare(self) -> None:
        """Create the directories."""
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.blob_dir.mkdir(parents=True, exist_ok=True)

    def clean_spool(self) -> int:
        """Remove the spool files a crash left behind; only the gateway process
        owning this spool may call it, before it listens (app.py)."""
        removed = 0
        for leftover in self.spool_dir.iterdir():
            # Never acknowledged: a spool file is only renamed away after
            # the whole message was received.
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed

    def new_spool(self) -> Spool:
        return Spool(self.spool_dir / f"{secrets.token_hex(16)}.tmp", secrets.token_bytes(32))

    def path_of(self, key: str) -> Path:
        return self.blob_dir / key[:2] / key[2:4] / key

    def commit(self, spool: Spool) -> str:
        """Make the spooled bytes a durable blob and return its key (blocking)."""
        spool.finish()
        key = secrets.token_hex(16)
        target = self.path_of(key)
        created: list[Path] = []
        for directory in (target.parent.parent, target.parent):
            if not directory.exists():
                directory.mkdir(exist_ok=True)
                created.append(directory)
        os.rename(spool.path, target)
        # The new name is what must survive a crash; the old one, if a
        # crash left it, is a spool leftover removed at the next start.
        _fsync_dir(target.parent)
        # A directory created here must itself be recorded in its parent.
        for directory in created:
            _fsync_dir(directory.parent)
        return key

    def open(self, key: str, message_key: bytes) -> BinaryIO:
        """The plaintext as a stream; reading raises DecryptionError if altered."""
        return io.BufferedReader(
            StreamDecryptor(message_key, open(self.path_of(key), "rb")),
            buffer_size=SEGMENT,
        )

    def read(self, key: str, message_key: bytes) -> bytes:
        with self.open(key, message_key) as f:
            return f.read()

    def delete(self, key: str) -> None:
        self.path_of(key).unlink(missing_ok=True)
