"""Shared fixtures: a real gateway on port 0 with a temp data directory.

The gateway runs on each database the project supports: ``[sqlite]`` in the
data directory, ``[postgresql]`` in a fresh database of a real server
(tests/pg.py), started once for the session when a test first needs it.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mssante.app import Gateway
from mssante.cli import seed_demo
from mssante.settings import (
    NotifySettings,
    OpsSettings,
    OutboundSettings,
    Settings,
    SmtpSettings,
    StoreSettings,
    SubmissionSettings,
    TrustSettings,
    WebSettings,
)
from tests import pg

DATABASES = ["sqlite", "postgresql"]


class FakeClock:
    """The clock is the outside world: tests move it by hand."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 11, 23, 9, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self._now

    def advance(self, **delta: float) -> None:
        self._now += timedelta(**delta)


def make_settings(
    data_dir: Path,
    *,
    database_url: str | None = None,
    trust: TrustSettings | None = None,
    **smtp: object,
) -> Settings:
    """Settings for a test gateway.  Without ``trust``, the trust-space checks
    (STARTTLS required, operator certificates) are off so that protocol and
    store tests can speak plain SMTP; tests/test_trust.py turns them on."""
    smtp.setdefault("require_tls", trust is not None)
    return Settings(
        smtp=SmtpSettings(port=0, hostname="mx.test.localhost", **smtp),  # type: ignore[arg-type]
        store=StoreSettings(data_dir=data_dir, database_url=database_url),
        trust=trust or TrustSettings(require_client_certificate=False),
        submission=SubmissionSettings(port=0, implicit_tls_port=0),
        # The background workers would race with what a test checks; tests
        # of notifications and of the outbound queue run the passes themselves.
        notify=NotifySettings(worker_enabled=False),
        outbound=OutboundSettings(worker_enabled=False),
        # The webmail is started by the tests that use it (tests/webmail.py).
        web=WebSettings(enabled=False, port=0),
        # Metrics and probes: started by the tests that scrape them.
        ops=OpsSettings(enabled=False, port=0),
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """A PostgreSQL server for the session: MSSANTE_TEST_PG_URL, or one started here.

    Without PostgreSQL binaries the tests that need it fail (CI installs them).
    """
    if url := os.environ.get(pg.ENV_URL):
        yield url
        return
    cluster = pg_cluster_or_fail()
    try:
        yield cluster.url()
    finally:
        cluster.remove()


def pg_cluster_or_fail() -> pg.PgCluster:
    """A started cluster, or the test fails saying what is missing (never a skip)."""
    problem = ""
    try:
        cluster = pg.PgCluster()
        atexit.register(cluster.remove)  # should the session end without teardown
        try:
            cluster.start()
        except pg.PgUnavailable:
            cluster.remove()
            raise
    except pg.PgUnavailable as exc:
        problem = str(exc)
    if problem:
        pytest.fail(problem, pytrace=False)
    return cluster


@pytest.fixture(params=DATABASES)
async def db_url(request: pytest.FixtureRequest, data_dir: Path) -> AsyncIterator[str]:
    """The database URL of this test: SQLite in ``data_dir``, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        data_dir.mkdir(parents=True, exist_ok=True)
        yield StoreSettings(data_dir=data_dir).url()
        return
    admin_url = request.getfixturevalue("pg_admin_url")
    async with pg.fresh_database(admin_url) as url:
        yield url


@pytest.fixture
async def gateway(data_dir: Path, db_url: str, clock: FakeClock) -> AsyncIterator[Gateway]:
    settings = make_settings(data_dir, database_url=db_url, max_message_size=200_000)
    gw = Gateway(settings, clock=clock)
    await gw.start()
    await seed_demo(gw.store)
    try:
        yield gw
    finally:
        await gw.stop()
