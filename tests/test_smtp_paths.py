"""The fast MAIL/RCPT path reader (protocol.GatewayProtocol._getaddr) gives
exactly what aiosmtpd's own parser gives, for every path it takes."""

from __future__ import annotations

import asyncio
import string

from aiosmtpd.smtp import SMTP
from hypothesis import given
from hypothesis import strategies as st

from mssante.metrics import Metrics
from mssante.smtp.protocol import _PLAIN_PATH, GatewayProtocol


class _Handler:
    pass


def _protocol() -> GatewayProtocol:
    loop = asyncio.new_event_loop()
    try:
        return GatewayProtocol(
            _Handler(),
            max_message_size=1000,
            max_header_size=2000,
            metrics=Metrics().listener("mx"),
            hostname="t",
            loop=loop,
        )
    finally:
        loop.close()


PROTOCOL = _protocol()
LIMITED = _protocol()
LIMITED.local_part_limit = 64  # RFC 5321 4.5.3.1.1 (aiosmtpd's default: no limit)


def _outcome(read: object, protocol: GatewayProtocol, arg: str) -> object:
    """What a reader returns, or the type of what it raises (aiosmtpd's raises
    IndexError on some inputs, e.g. a lone double quote)."""
    try:
        return read(protocol, arg)  # type: ignore[operator]
    except Exception as exc:
        return type(exc)


def _same(protocol: GatewayProtocol, arg: str) -> None:
    fast = _outcome(GatewayProtocol._getaddr, protocol, arg)
    slow = _outcome(SMTP._getaddr, protocol, arg)
    assert fast == slow, (arg, fast, slow)


ATEXT = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
# Characters that make a path unusual, so both readers must agree on them too.
ODD = ' \t."()<>[]@:;,\\é'

atoms = st.text(alphabet=ATEXT, min_size=1, max_size=8)
local = st.lists(atoms, min_size=1, max_size=3).map(".".join)
labels = st.text(alphabet=string.ascii_letters + string.digits + "-", min_size=1, max_size=8)
domain = st.lists(labels, min_size=1, max_size=4).map(".".join)
rest = st.sampled_from(["", " SIZE=1000", "  BODY=8BITMIME SIZE=12  ", "\tX", "NOTIFY=NEVER"])
noise = st.text(alphabet=ATEXT + ODD, max_size=40)


@given(local, domain, rest, st.sampled_from(["", " ", "  ", "\t"]))
def test_plain_paths_read_as_aiosmtpd_reads_them(lp: str, d: str, r: str, lead: str) -> None:
    arg = f"{lead}<{lp}@{d}>{r}"
    assert _PLAIN_PATH.match(arg), arg  # the fast path really is taken
    _same(PROTOCOL, arg)
    _same(LIMITED, arg)


@given(noise)
def test_any_text_reads_as_aiosmtpd_reads_it(arg: str) -> None:
    _same(PROTOCOL, arg)


@given(st.text(alphabet=ATEXT, min_size=65, max_size=90), domain)
def test_local_part_limit_applies_on_the_fast_path(lp: str, d: str) -> None:
    arg = f"<{lp}@{d}>"
    assert LIMITED._getaddr(arg) == SMTP._getaddr(LIMITED, arg) == (None, None)


def test_unusual_paths_go_to_aiosmtpd() -> None:
    for arg in ['<"q u"@b>', "<a@[1.2.3.4]>", "<@r:a@b>", "<>", "<a.@b>", "<é@b>", "<a@b.>"]:
        assert _PLAIN_PATH.match(arg) is None, arg
        _same(PROTOCOL, arg)
