"""Abuse limits over a real socket: rates, recipients, harvesting resistance, 421."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mssante import demo
from mssante.app import Gateway
from mssante.cli import seed_demo
from mssante.routing.ins import with_key
from mssante.settings import LimitsSettings
from mssante.smtp import replies
from tests.conftest import FakeClock, make_settings
from tests.rawsmtp import RawSmtp

DOCTOR = "dr.durand@chu-exemple.mssante.fr"
VALID = f"{demo.ACTIVATED}@patient.mssante.fr"


def unknown(n: int) -> str:
    return f"{with_key(f'18512751{n:05d}')}@patient.mssante.fr"


@pytest.fixture
async def limited(tmp_path: Path, db_url: str, clock: FakeClock) -> AsyncIterator[Gateway]:
    settings = make_settings(tmp_path / "data", database_url=db_url).model_copy(
        update={
            "limits": LimitsSettings(
                messages_per_minute=3,
                recipients_per_message=2,
                bad_recipients_per_session=3,
                bad_recipients_per_day=5,
                close_after_bad_in_session=6,
            )
        }
    )
    gw = Gateway(settings, clock=clock)
    await gw.start()
    await seed_demo(gw.store)
    try:
        yield gw
    finally:
        await gw.stop()


async def session(gw: Gateway) -> RawSmtp:
    c = await RawSmtp.connect("127.0.0.1", gw.smtp.port)
    await c.cmd("EHLO client.test")
    return c


async def test_harvesting_gets_the_same_answer_for_valid_addresses(limited: Gateway) -> None:
    c = await session(limited)
    assert (await c.cmd(f"MAIL FROM:<{DOCTOR}>")).code == 250
    for n in range(3):
        assert (await c.cmd(f"RCPT TO:<{unknown(n)}>")).code == 550
    # Budget spent: a valid address now gets exactly what an unknown one gets.
    valid = await c.cmd(f"RCPT TO:<{VALID}>")
    invalid = await c.cmd(f"RCPT TO:<{unknown(9)}>")
    assert (valid.code, valid.text) == (invalid.code, invalid.text)
    assert valid.code == replies.TOO_MANY_BAD_RECIPIENTS.code
    assert valid.enhanced == replies.TOO_MANY_BAD_RECIPIENTS.enhanced
    # Going on probing (the sixth strike) closes the session.
    r = await c.cmd(f"RCPT TO:<{unknown(12)}>")
    assert (r.code, r.enhanced) == (421, "4.7.0")
    assert await c.reader.read() == b""  # closed by the server
    await c.close()


async def test_daily_budget_outlives_the_session(limited: Gateway, clock: FakeClock) -> None:
    c = await session(limited)
    await c.cmd(f"MAIL FROM:<{DOCTOR}>")
    for n in range(3):
        await c.cmd(f"RCPT TO:<{unknown(n)}>")
    await c.close()
    c = await session(limited)
    await c.cmd(f"MAIL FROM:<{DOCTOR}>")
    assert (await c.cmd(f"RCPT TO:<{VALID}>")).code == 250  # a new session, budget left
    for n in range(3, 5):
        assert (await c.cmd(f"RCPT TO:<{unknown(n)}>")).code == 550
    await c.close()
    c = await session(limited)
    await c.cmd(f"MAIL FROM:<{DOCTOR}>")
    assert (await c.cmd(f"RCPT TO:<{VALID}>")).code == 450  # 5 a day spent
    await c.close()
    clock.advance(hours=24, seconds=1)
    c = await session(limited)
    await c.cmd(f"MAIL FROM:<{DOCTOR}>")
    assert (await c.cmd(f"RCPT TO:<{VALID}>")).code == 250
    await c.close()


async def test_messages_per_minute(limited: Gateway, clock: FakeClock) -> None:
    c = await session(limited)
    for _ in range(3):
        assert (await c.cmd(f"MAIL FROM:<{DOCTOR}>")).code == 250
        await c.cmd("RSET")
    r = await c.cmd(f"MAIL FROM:<{DOCTOR}>")
    assert (r.code, r.enhanced) == (451, "4.7.0")
    clock.advance(seconds=61)
    assert (await c.cmd(f"MAIL FROM:<{DOCTOR}>")).code == 250
    await c.close()


async def test_recipients_per_message(limited: Gateway) -> None:
    c = await session(limited)
    await c.cmd(f"MAIL FROM:<{DOCTOR}>")
    for ins in (demo.ACTIVATED, demo.CREATED_EMAIL):
        assert (await c.cmd(f"RCPT TO:<{ins}@patient.mssante.fr>")).code == 250
    r = await c.cmd(f"RCPT TO:<{demo.CREATED_POSTAL}@patient.mssante.fr>")
    assert (r.code, r.enhanced) == (452, "4.5.3")
    await c.close()
