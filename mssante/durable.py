"""Writing small files that must survive a power cut (keys, pointers).

Write to a temporary file, fsync it, rename it over the target, fsync the
directory: after a crash the file is either absent or whole, never empty
(POSIX rename is atomic; the directory fsync makes the rename durable).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_file(path: Path, data: bytes, *, mode: int = 0o600, exclusive: bool = False) -> None:
    """Durably write ``data`` to ``path``; with ``exclusive``, fail if it exists."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)  # fails with FileExistsError, atomically
            tmp.unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd_dir = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd_dir)
    finally:
        os.close(fd_dir)
