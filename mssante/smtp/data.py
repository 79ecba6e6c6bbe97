"""The DATA phase: framing, transparency and limits, read in bulk.

Stock aiosmtpd awaits one ``readuntil`` per line; here the receiver is fed
whatever the socket delivered (up to hundreds of KB at once) and works on
whole buffers with C-speed ``bytes`` methods.  It is a plain, synchronous
state machine so it can be tested without a socket, byte by byte if need be.

Rules (RFC 5321):
- the data ends with ``<CRLF>.<CRLF>`` (4.1.1.4); the ``<CRLF>`` before the dot
  ends the last line, and a message may be empty (``.<CRLF>`` first);
- a line starting with a dot had one dot added by the client (4.5.2): it is
  removed;
- CR and LF only ever appear together as ``<CRLF>`` (2.3.8).  A bare CR or LF
  is refused, and only the real ``<CRLF>.<CRLF>`` ends the data, so a
  ``<LF>.<LF>`` or ``<LF>.<CRLF>`` sent to smuggle a second message is just
  refused content (SMTP smuggling, CVE-2023-51764/51765/51766);
- a NUL octet is refused (RFC 5322 2.1: not allowed in message text);
- a line is at most 998 octets plus CRLF (4.5.3.1.6), plus one for a
  transparency dot;
- beyond ``max_size`` octets nothing more is kept (RFC 1870).

A refused message is still read to its real end before the reply is sent
(RFC 5321 4.2.5: the reply to DATA comes after the end of the data), so the
client and the server stay in step and nothing of it is taken for commands.

BDAT (RFC 3030) chunks go through the same receiver made with
``dot_transparency=False``: the octet count frames the data, so there is no
end mark and no transparency dot (a line ``.`` or ``<CRLF>.<CRLF>`` is just
content), but every other rule above applies to the assembled message, as
CHUNKING without BINARYMIME still carries 7bit/8bitmime text (RFC 3030 3).
The protocol feeds each chunk and calls :meth:`DataReceiver.finish` after
the LAST one.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

END_MARK = b"\r\n.\r\n"
EMPTY_END = b".\r\n"
# 998 octets of text + CR (the LF is the separator), one more with a dot.
MAX_LINE = 999


class DataProblem(enum.Enum):
    TOO_BIG = "too_big"
    BARE_LINE_ENDING = "bare_line_ending"
    NUL = "nul"
    LINE_TOO_LONG = "line_too_long"
    HEADER_TOO_BIG = "header_too_big"


class DataReceiver:
    """Feed it socket bytes; it writes the message content to ``sink``.

    :meth:`feed` returns ``None`` while more data is needed, or the index in
    the chunk just after the end mark: what follows belongs to the next
    commands (RFC 2920 pipelining).  Without ``dot_transparency`` (BDAT) it
    always returns ``None``: the caller knows where the data ends and calls
    :meth:`finish` there.
    """

    def __init__(
        self,
        sink: Callable[[bytes], object],
        max_size: int,
        max_header: int = 256 * 1024,
        *,
        dot_transparency: bool = True,
    ) -> None:
        self._sink = sink
        self._dots = dot_transparency
        self._max_size = max_size
        # The header section ends at the first empty line (RFC 5322 2.1);
        # until then its size is counted against ``max_header``.
        self._max_header = max_header
        self._in_header = True
        self.size = 0
        self.problem: DataProblem | None = None
        # Unprocessed bytes.  Unless ``_midline``, they start a line.
        self._tail = b""
        # True while skipping the rest of an over-long line.
        self._midline = False

    def feed(self, chunk: bytes) -> int | None:
        if not self._dots:
            self._feed_counted(chunk)
            return None
        buf = self._tail + chunk
        consumed_before = len(self._tail)
        start = 0
        if self._midline:
            end = buf.find(END_MARK)
            if end >= 0:
                self._tail = b""
                return end + len(END_MARK) - consumed_before
            crlf = buf.find(b"\r\n")
            if crlf < 0:
                self._tail = buf[-1:]  # a CR waiting for its LF
                return None
            self._midline = False
            start = crlf + 2
        if buf.startswith(EMPTY_END, start):
            self._tail = b""
            return start + len(EMPTY_END) - consumed_before
        end = buf.find(END_MARK, start)
        if end >= 0:
            self._take(buf, start, end + 2)
            self._tail = b""
            return end + len(END_MARK) - consumed_before
        # Keep the last, unfinished line (after the last CRLF) for next time:
        # it starts a line, so an end mark split across chunks is still seen.
        last = buf.rfind(b"\r\n", start)
        cut = start if last < 0 else last + 2
        if cut > start:
            self._take(buf, start, cut)
        self._tail = buf[cut:]
        if len(self._tail) > MAX_LINE + 2:
            # No CRLF for longer than a line may be: refuse, stop buffering.
            self._flag(self._classify_long(self._tail))
            self._tail = self._tail[-1:]
            self._midline = True
        return None

    def _feed_counted(self, chunk: bytes) -> None:
        """BDAT: check and keep the complete lines; the last, unfinished one
        waits for the next chunk (a line, even a CRLF, may span chunks)."""
        if self.problem is not None:
            return  # refused: the rest is read by the caller and dropped
        buf = self._tail + chunk
        last = buf.rfind(b"\r\n")
        cut = 0 if last < 0 else last + 2
        if cut:
            self._take(buf, 0, cut)
        self._tail = buf[cut:]
        if len(self._tail) > MAX_LINE:
            # 998 octets and a CR at most before the LF: refuse, stop buffering.
            self._flag(self._classify_long(self._tail))
            self._tail = b""
        elif self.size + len(self._tail) > self._max_size:
            # Every octet is content here: refuse on the chunk that crosses it.
            self._flag(DataProblem.TOO_BIG)

    def finish(self) -> None:
        """BDAT LAST: the data ends here, the last line may lack its CRLF.

        Kept as received (STYLE.md 6: never rewrite received bytes), after
        the same checks; a CR left at the very end is a bare CR.
        """
        tail, self._tail = self._tail, b""
        if self.problem is not None or not tail:
            return
        clean = not any(octet in tail for octet in (b"\x00", b"\r", b"\n"))
        if clean and len(tail) > MAX_LINE - 1:  # 998 octets without the CRLF
            self._flag(DataProblem.LINE_TOO_LONG)
            return
        self._take(tail, 0, len(tail))  # refuses NUL, bare CR or LF

    def _take(self, buf: bytes, start: int, stop: int) -> None:
        """Check and keep complete lines ``buf[start:stop]`` (ends with CRLF)."""
        if self.problem is not None:
            return  # already refused: only the end mark matters now
        region = buf[start:stop]
        if b"\x00" in region:
            self._flag(DataProblem.NUL)
            return
        crlf = region.count(b"\r\n")
        if region.count(b"\n") != crlf or region.count(b"\r") != crlf:
            self._flag(DataProblem.BARE_LINE_ENDING)
            return
        if len(region) > MAX_LINE + 1 and self._has_long_line(region, self._dots):
            self._flag(DataProblem.LINE_TOO_LONG)
            return
        if self._dots:
            # RFC 5321 4.5.2: drop the transparency dot at the start of a line.
            if region[:1] == b".":
                region = region[1:]
            if b"\n." in region:
                region = region.replace(b"\n.", b"\n")
        if self._in_header:
            self._count_header(region)
            if self.problem is not None:
                return
        self.size += len(region)
        if self.size > self._max_size:
            self._flag(DataProblem.TOO_BIG)
            return
        self._sink(region)

    def _count_header(self, region: bytes) -> None:
        # Regions start at a line start, so an empty line is either the
        # region's first line or follows a CRLF inside it.
        if region.startswith(b"\r\n"):
            end = 0
        else:
            found = region.find(b"\r\n\r\n")
            end = -1 if found < 0 else found + 2
        header_bytes = self.size + (len(region) if end < 0 else end)
        if header_bytes > self._max_header:
            self._flag(DataProblem.HEADER_TOO_BIG)
        elif end >= 0:
            self._in_header = False

    @staticmethod
    def _has_long_line(region: bytes, dots: bool) -> bool:
        lines = region.split(b"\n")
        if max(map(len, lines)) <= MAX_LINE:
            return False
        # A transparency dot (DATA only) does not count against the limit.
        return any(len(line) > MAX_LINE + (dots and line.startswith(b".")) for line in lines)

    @staticmethod
    def _classify_long(tail: bytes) -> DataProblem:
        if b"\x00" in tail:
            return DataProblem.NUL
        if b"\n" in tail or b"\r" in tail[:-1]:
            return DataProblem.BARE_LINE_ENDING
        return DataProblem.LINE_TOO_LONG

    def _flag(self, problem: DataProblem) -> None:
        if self.problem is None:
            self.problem = problem
