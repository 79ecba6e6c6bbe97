"""Kill -9 durability: every message that got 250 survives SIGKILL, once and intact.

The harness (tests/durability_harness.py) runs the real server as a
subprocess, loads it with concurrent clients, SIGKILLs it at random moments,
restarts it on the same data directory, and finally checks the store
in-process.  Seeds are fixed so a failure can be replayed (the kill moments
still depend on timing); each run is bounded (a few seconds).

Every test runs on both databases (the ``db_url`` fixture of tests/conftest.py:
SQLite in the test's data directory, which is also the harness's, or a fresh
PostgreSQL database).  To bound CI time the load test runs all seeds on SQLite
and the first two on PostgreSQL, with the same number of kills and the same
checks.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from random import Random

import pytest

from mssante.app import Gateway
from mssante.cli import seed_demo
from tests.conftest import DATABASES, make_settings
from tests.durability_harness import (
    SentMessage,
    client_tls,
    make_message,
    run_harness,
    run_large_kill,
    send_whole,
    verify_store,
)

pytestmark = pytest.mark.slow

SEEDS = [1009, 2027, 3041, 4051]
SEEDS_BY_DATABASE = {"sqlite": SEEDS, "postgresql": SEEDS[:2]}
assert set(SEEDS_BY_DATABASE) == set(DATABASES)
KILLS = 3


@pytest.mark.parametrize(
    ("db_url", "seed"),
    [
        pytest.param(db, seed, id=f"{db}-{seed}")
        for db in DATABASES
        for seed in SEEDS_BY_DATABASE[db]
    ],
    indirect=["db_url"],
)
async def test_sigkill_never_loses_an_acknowledged_message(
    tmp_path: Path, db_url: str, seed: int
) -> None:
    report = await run_harness(tmp_path, seed=seed, kills=KILLS, clients=8, database_url=db_url)
    summary = report.summary()
    print(summary)  # shown with -s or on failure: the numbers of the run
    assert report.check.problems == [], summary + "\n" + "\n".join(report.check.problems)

    # Not vacuous: the server really died mid-load, with acknowledged
    # messages on disk and transactions cut off by the kill.
    killed = [c for c in report.cycles if c.kill_delay_ms is not None]
    assert len(killed) == KILLS and all(c.exit_code == -9 for c in killed), summary
    assert report.kills_in_flight >= 1, summary
    acked_by = 0
    kill_after_ack = False
    for cycle in killed:
        acked_by += cycle.acked
        kill_after_ack = kill_after_ack or (acked_by > 0 and cycle.inflight_at_kill > 0)
    assert kill_after_ack, "no kill came after an acknowledgement:\n" + summary
    assert report.count("acked") >= 1 and report.count("unknown") >= 1, summary
    assert report.count("refused") == 0, summary
    assert report.check.stored >= report.count("acked"), summary
    assert report.cycles[-1].exit_code == 0, summary


async def test_sigkill_during_large_data_leaves_nothing_partial(
    tmp_path: Path, db_url: str
) -> None:
    report = await run_large_kill(tmp_path, seed=5, size=20_000_000, database_url=db_url)
    print(report)
    # The kill fell while a big part of the message was already in the spool.
    assert report.spool_bytes_at_kill >= 5_000_000, report
    assert report.spool_files_after_restart == 0, report
    # The cut message is nowhere; the same size sent again after restart is stored whole.
    assert report.check.problems == [], report
    assert report.resent_ref is not None and report.check.stored == 1, report


async def test_checker_catches_loss_corruption_and_strangers(tmp_path: Path, db_url: str) -> None:
    """The checks are not vacuous: they flag what they are meant to flag."""
    data_dir = tmp_path / "data"
    gateway = Gateway(make_settings(data_dir, database_url=db_url))
    await gateway.start()
    try:
        await seed_demo(gateway.store)
        rng = Random(99)
        msg = make_message(rng, message_id="<self-test.1@chu-exemple.test>", size=20_000, cycle=0)
        await send_whole(gateway.smtp.port, client_tls(data_dir), msg)
        assert msg.status == "acked", msg.reply
    finally:
        await gateway.stop()

    async def problems(*sent: SentMessage) -> list[str]:
        return (await verify_store(data_dir, list(sent), db_url)).problems

    assert await problems(msg) == []

    lost = SentMessage("<self-test.2@x>", b"x\r\n", msg.recipients, "lines", 0, "acked", "nope")
    assert any(p.startswith("LOST") for p in await problems(msg, lost))

    changed = replace(msg, data=msg.data[:-3] + b"!\r\n")
    assert any("not byte-identical" in p for p in await problems(changed))

    partial = replace(msg, status="unknown", ref=None, end_sent=False)
    assert any("never sent" in p for p in await problems(partial))

    assert any("match no message sent" in p for p in await problems())

    (data_dir / "spool" / "left.tmp").write_bytes(b"half")
    assert any("spool not empty" in p for p in await problems(msg))
