"""The DATA receiver alone: framing, transparency and limits, chunked every way."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mssante.smtp.data import DataProblem, DataReceiver


def receive(wire: bytes, *, chunk: int | None = None, max_size: int = 10_000_000):
    """Feed ``wire`` in chunks; return (content, problem, rest after the end mark)."""
    out = bytearray()
    rx = DataReceiver(out.extend, max_size)
    step = chunk or len(wire) or 1
    for i in range(0, len(wire), step):
        piece = wire[i : i + step]
        end = rx.feed(piece)
        if end is not None:
            rest = piece[end:] + wire[i + step :]
            return bytes(out), rx.problem, rest
    return bytes(out), rx.problem, None


CHUNKS = [None, 1, 2, 3, 5, 7, 64]


@pytest.mark.parametrize("chunk", CHUNKS)
def test_simple_message_and_pipelined_rest(chunk: int | None) -> None:
    wire = b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n"
    assert receive(wire, chunk=chunk) == (b"Subject: x\r\n\r\nhello\r\n", None, b"QUIT\r\n")


@pytest.mark.parametrize("chunk", CHUNKS)
def test_empty_message(chunk: int | None) -> None:
    assert receive(b".\r\nMAIL", chunk=chunk) == (b"", None, b"MAIL")


@pytest.mark.parametrize("chunk", CHUNKS)
def test_dot_unstuffing(chunk: int | None) -> None:
    wire = b"..first\r\na\r\n...\r\n..\r\n.x\r\n.\r\n"
    content, problem, rest = receive(wire, chunk=chunk)
    assert content == b".first\r\na\r\n..\r\n.\r\nx\r\n"
    assert problem is None and rest == b""


@pytest.mark.parametrize("chunk", CHUNKS)
def test_empty_lines_before_end(chunk: int | None) -> None:
    assert receive(b"\r\n\r\n.\r\n", chunk=chunk)[:2] == (b"\r\n\r\n", None)


# Smuggling variants (CVE-2023-51764 Postfix, CVE-2023-51765 Sendmail,
# CVE-2023-51766 Exim): none of these end the data; only <CRLF>.<CRLF> does,
# and the message carrying them is refused.
SMUGGLING = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r\n.\n",
    b"\r.\n",
    b"\n.\r",
    b"\r\n\x00.\r\n",
]


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("mark", SMUGGLING)
def test_smuggling_marks_do_not_end_data(mark: bytes, chunk: int | None) -> None:
    smuggled = b"MAIL FROM:<evil@x>\r\nRCPT TO:<y@z>\r\nDATA\r\nevil\r\n"
    wire = b"Subject: a\r\n\r\nbody" + mark + smuggled + b".\r\nNEXT"
    _, problem, rest = receive(wire, chunk=chunk)
    assert rest == b"NEXT"  # the real end, after the smuggled commands
    assert problem in (DataProblem.BARE_LINE_ENDING, DataProblem.NUL)


@pytest.mark.parametrize("chunk", [None, 100, 1001])
def test_line_of_998_octets_is_fine_999_is_not(chunk: int | None) -> None:
    ok = b"a" * 998 + b"\r\n"
    assert receive(ok + b".\r\n", chunk=chunk)[1] is None
    # A transparency dot does not count against the limit.
    assert receive(b"." + ok + b".\r\n", chunk=chunk)[:2] == (ok, None)
    long = b"a" * 999 + b"\r\n"
    assert receive(b"x\r\n" + long + b".\r\nN", chunk=chunk)[1:] == (
        DataProblem.LINE_TOO_LONG,
        b"N",
    )


def test_endless_line_is_not_buffered() -> None:
    out = bytearray()
    rx = DataReceiver(out.extend, 10_000_000)
    for _ in range(1000):
        assert rx.feed(b"x" * 10_000) is None
        assert len(rx._tail) <= 1001  # bounded whatever the client sends
    assert rx.feed(b"\r\n.\r\n") is not None
    assert rx.problem is DataProblem.LINE_TOO_LONG


@pytest.mark.parametrize("chunk", [None, 10, 4096])
def test_size_limit_stops_keeping_data(chunk: int | None) -> None:
    wire = (b"y" * 98 + b"\r\n") * 100 + b".\r\nQUIT\r\n"
    content, problem, rest = receive(wire, chunk=chunk, max_size=5_000)
    assert problem is DataProblem.TOO_BIG
    assert len(content) <= 5_000
    assert rest == b"QUIT\r\n"


@given(
    st.lists(
        st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b), max_size=30
    ),
    st.integers(1, 50),
)
def test_property_any_clean_text_round_trips(lines: list[bytes], chunk: int) -> None:
    content = b"".join(line + b"\r\n" for line in lines).replace(b"\x00", b"")
    stuffed = b"".join(
        (b"." + line if line.startswith(b".") else line) + b"\r\n"
        for line in content.split(b"\r\n")[:-1]
    )
    got, problem, rest = receive(stuffed + b".\r\n", chunk=chunk)
    assert (got, problem, rest) == (content, None, b"")


@pytest.mark.parametrize("chunk", [None, 1, 7, 500])
def test_header_limit_counts_only_the_header(chunk: int | None) -> None:
    header = b"A: " + b"x" * 95 + b"\r\n"  # 100 octets
    ok = header * 9 + b"\r\n" + header * 50 + b".\r\n"
    out = bytearray()
    rx = DataReceiver(out.extend, 10_000_000, max_header=1000)
    step = chunk or len(ok)
    ends = [rx.feed(ok[i : i + step]) for i in range(0, len(ok), step)]
    assert rx.problem is None and ends[-1] is not None
    too_big = header * 11 + b"\r\nbody\r\n.\r\n"
    rx = DataReceiver(bytearray().extend, 10_000_000, max_header=1000)
    for i in range(0, len(too_big), step):
        rx.feed(too_big[i : i + step])
    assert rx.problem is DataProblem.HEADER_TOO_BIG


def test_message_without_header_section() -> None:
    rx = DataReceiver(bytearray().extend, 10_000_000, max_header=10)
    assert rx.feed(b"\r\n" + b"z" * 500 + b"\r\n.\r\n") is not None
    assert rx.problem is None
