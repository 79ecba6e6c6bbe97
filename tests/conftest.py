"""Shared fixtures: a real gateway on port 0 with a temp data directory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mssante.app import Gateway
from mssante.cli import seed_demo
from mssante.settings import Settings, SmtpSettings, StoreSettings


class FakeClock:
    """The clock is the outside world: tests move it by hand."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 11, 23, 9, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self._now

    def advance(self, **delta: float) -> None:
        self._now += timedelta(**delta)


def make_settings(data_dir: Path, **smtp: object) -> Settings:
    return Settings(
        smtp=SmtpSettings(port=0, hostname="mx.test.localhost", **smtp),  # type: ignore[arg-type]
        store=StoreSettings(data_dir=data_dir),
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
async def gateway(data_dir: Path, clock: FakeClock) -> AsyncIterator[Gateway]:
    gw = Gateway(make_settings(data_dir, max_message_size=200_000), clock=clock)
    await gw.start()
    await seed_demo(gw.store)
    try:
        yield gw
    finally:
        await gw.stop()
