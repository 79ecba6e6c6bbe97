"""What a patient may attach to a reply (DOMAIN.md 4: pdf, txt, rtf, doc, jpeg, png, tiff).

A file is accepted only when its name and its content agree on one of
those types: the extension says what the patient's software will open it
with, the first octets ("magic") what it really is.  A renamed executable
(``ordonnance.pdf`` starting with ``MZ``) or a polyglot whose name and
content disagree (``photo.png`` holding a JPEG) is refused.  The content
type the browser sent is ignored: the part goes out with the type found
here.

Limits of a magic check, on purpose: a ``.doc`` is any OLE2 compound file
(Word 97-2003, but also what other OLE2 formats look like); a PDF must start
with ``%PDF-`` (readers tolerate leading junk, we do not); text is UTF-8
without NUL.  It tells what a file is, not that it is harmless: the
professional's side still scans what it receives.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Attachment:
    """A file the patient attached, as the webmail received it."""

    name: str
    content_type: str  # as sent by the browser: informative only, never trusted
    data: bytes


class FileType(enum.Enum):
    PDF = ("application", "pdf")
    TXT = ("text", "plain")
    RTF = ("application", "rtf")
    DOC = ("application", "msword")
    JPEG = ("image", "jpeg")
    PNG = ("image", "png")
    TIFF = ("image", "tiff")

    @property
    def maintype(self) -> str:
        return self.value[0]

    @property
    def subtype(self) -> str:
        return self.value[1]


EXTENSIONS: dict[str, FileType] = {
    "pdf": FileType.PDF,
    "txt": FileType.TXT,
    "rtf": FileType.RTF,
    "doc": FileType.DOC,
    "jpg": FileType.JPEG,
    "jpeg": FileType.JPEG,
    "png": FileType.PNG,
    "tif": FileType.TIFF,
    "tiff": FileType.TIFF,
}

# First octets of each binary type.
_MAGIC: list[tuple[bytes, FileType]] = [
    (b"%PDF-", FileType.PDF),
    (b"\x89PNG\r\n\x1a\n", FileType.PNG),
    (b"\xff\xd8\xff", FileType.JPEG),
    (b"II*\x00", FileType.TIFF),  # little-endian TIFF
    (b"MM\x00*", FileType.TIFF),  # big-endian TIFF
    (b"{\\rtf", FileType.RTF),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", FileType.DOC),  # OLE2 compound file
]

MAX_NAME = 200
_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f/\\]")


def sniff(data: bytes) -> FileType | None:
    """The type the content says it is, or None."""
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    if b"\x00" in data:
        return None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return FileType.TXT


def by_name(name: str) -> FileType | None:
    """The type the file name says it is, or None (no or unknown extension)."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem.strip():
        return None
    return EXTENSIONS.get(ext.lower())


def check(attachment: Attachment) -> FileType | None:
    """The attachment's type when name and content agree on an allowed one, else None."""
    name = attachment.name
    if not name or len(name) > MAX_NAME or _UNSAFE_NAME.search(name) or name.strip() != name:
        return None
    named = by_name(name)
    if named is None:
        return None
    return named if sniff(attachment.data) is named else None
