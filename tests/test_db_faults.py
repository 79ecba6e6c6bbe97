"""The database as the outside world: shared by processes, stopped under load (PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import re
import socket
import struct
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from mssante import demo
from mssante.app import Gateway, Store
from mssante.cli import seed_demo
from mssante.settings import LimitsSettings
from mssante.smtp import replies
from mssante.store import audit
from mssante.store.models import AuditEvent, Patient, ProfileStatus
from tests import pg
from tests.conftest import FakeClock, make_settings, pg_cluster_or_fail
from tests.rawsmtp import RawSmtp, Reply

DOCTOR = "dr.durand@chu-exemple.mssante.fr"
RCPT = f"{demo.ACTIVATED}@patient.mssante.fr"


async def until(check: Callable[[], bool | Awaitable[bool]], *, timeout: float = 20) -> None:
    """Poll a condition that has no event to await (another server's state, load)."""
    async with asyncio.timeout(timeout):
        while True:
            result = check()
            if await result if inspect.isawaitable(result) else result:
                return
            await asyncio.sleep(0.01)


# --- several processes, one database ----------------------------------------------------


@pytest.fixture
async def shared_url(pg_admin_url: str) -> AsyncIterator[str]:
    async with pg.fresh_database(pg_admin_url) as url:
        yield url


async def test_writers_of_two_processes_keep_one_audit_chain(
    shared_url: str, tmp_path: Path, clock: FakeClock
) -> None:
    """Each gateway process has its own single writer; the advisory lock taken
    by every writer transaction keeps the hash chain linear across them."""
    stores = [Store(make_settings(tmp_path / f"gw{i}", database_url=shared_url)) for i in (0, 1)]
    for store in stores:
        await store.open()
    try:

        def event(store: int, n: int):  # type: ignore[no-untyped-def]
            return lambda session: audit.append(
                session, at=clock.now(), kind="test.event", actor=f"gw{store}", details={"n": n}
            )

        async def waiting_on_the_lock() -> bool:
            async with stores[0].reads() as s:
                waiting = await s.scalar(
                    select(func.count())
                    .select_from(text("pg_stat_activity"))
                    .where(text("datname = current_database()"))
                    .where(text("wait_event_type = 'Lock' AND wait_event = 'advisory'"))
                )
            return bool(waiting)

        # While one process is in a write transaction, the other's writer waits.
        async with stores[0].write_engine.begin():
            second = asyncio.create_task(stores[1].writer.run(event(1, -1)))
            await until(waiting_on_the_lock)
            assert not second.done()
        await second

        await asyncio.gather(
            *(stores[i].writer.run(event(i, n)) for n in range(40) for i in (0, 1))
        )
        async with stores[0].reads() as session:
            count, problems = await audit.verify_stored_chain(session)
            actors = list(await session.scalars(select(AuditEvent.actor)))
        assert problems == []
        assert count == 81 and {actors.count("gw0"), actors.count("gw1")} == {40, 41}
    finally:
        for store in stores:
            await store.close()


async def test_postgresql_error_detail_stays_out_of_tracebacks(
    shared_url: str, tmp_path: Path, clock: FakeClock
) -> None:
    """hide_parameters keeps values out of SQL errors; PostgreSQL's DETAIL
    ("Key (ins)=(...) already exists") must stay out of the logged traceback too."""
    store = Store(make_settings(tmp_path / "data", database_url=shared_url))
    await store.open()
    try:

        async def add(session: AsyncSession) -> None:
            now = clock.now()
            session.add(
                Patient(
                    ins=demo.ACTIVATED, status=ProfileStatus.CREATED, created_at=now, updated_at=now
                )
            )
            await session.flush()

        await store.writer.run(add)
        with pytest.raises(IntegrityError) as raised:
            await store.writer.run(add)
        logged = "".join(traceback.format_exception(raised.value))
        assert "duplicate key value" in logged
        assert demo.ACTIVATED not in logged
    finally:
        await store.close()


# --- a server that resets connections -------------------------------------------------


class PgProxy:
    """A TCP proxy in front of the test server, with a failure switch.

    ``fail()`` acts like a server going down: open connections are cut and
    new ones are accepted, then reset (as a postmaster in shutdown does).
    """

    def __init__(self, url: str) -> None:
        target = make_url(url)
        self._target = (target.host or "127.0.0.1", target.port or 5432)
        self._url = target
        self.failing = False
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return self._url.set(port=port).render_as_string(hide_password=False)

    def fail(self) -> None:
        self.failing = True
        for writer in list(self._open):
            writer.transport.abort()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        self.fail()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if self.failing:
                await reader.read(8)  # the client's startup packet, then a reset
                writer.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                writer.transport.abort()
                return
            up_reader, up_writer = await asyncio.open_connection(*self._target)
            self._open |= {writer, up_writer}
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                self._open -= {writer, up_writer}
                up_writer.transport.abort()
        finally:
            writer.transport.abort()
            self._tasks.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.transport.abort()


async def test_database_connection_reset_is_451_not_a_hang_up(
    shared_url: str, tmp_path: Path, clock: FakeClock
) -> None:
    """Found by the outage test below: connecting to a PostgreSQL server that is
    shutting down raises a bare ConnectionResetError, which aiosmtpd takes for
    its own client's and closes the session without a reply.  The engine turns
    it into a database error: 451 4.3.0 at RCPT or at the end of DATA."""
    proxy = PgProxy(shared_url)
    gw = Gateway(make_settings(tmp_path / "data", database_url=await proxy.start()), clock=clock)
    await gw.start()
    try:
        await seed_demo(gw.store)
        c = await RawSmtp.connect("127.0.0.1", gw.smtp.port)
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd(f"MAIL FROM:<{DOCTOR}>")).code == 250
        assert (await c.cmd(f"RCPT TO:<{RCPT}>")).code == 250
        assert (await c.cmd("DATA")).code == 354
        proxy.fail()
        await c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        assert is_temporary_failure(await c.reply())  # end of DATA: the writer's connection
        assert (await c.cmd(f"MAIL FROM:<{DOCTOR}>")).code == 250
        assert is_temporary_failure(await c.cmd(f"RCPT TO:<{RCPT}>"))  # the directory's
        assert (await c.cmd("RSET")).code == 250

        proxy.failing = False
        assert (await c.cmd(f"MAIL FROM:<{DOCTOR}>")).code == 250
        assert (await c.cmd(f"RCPT TO:<{RCPT}>")).code == 250
        assert (await c.cmd("DATA")).code == 354
        await c.send(b"Subject: y\r\n\r\nbody\r\n.\r\n")
        assert (await c.reply()).code == 250
        await c.cmd("QUIT")
        await c.close()
    finally:
        await gw.stop()
        await proxy.close()


# --- the database server stops under load -----------------------------------------------


@dataclass
class Outcome:
    phase: str  # the database when the transaction began and when its last reply came
    stage: str  # "rcpt" or "data": the reply that ended the transaction
    reply: Reply
    body: bytes = b""

    @property
    def ref(self) -> str:
        match = re.search(r"ref (\w+)", self.reply.text)
        assert match, self.reply
        return match.group(1)


@dataclass
class Client:
    """One SMTP session sending message after message, recording every reply."""

    number: int
    smtp: RawSmtp
    outcomes: list[Outcome] = field(default_factory=list)
    sent: int = 0

    async def send_one(self, phase: Phase) -> Outcome:
        self.sent += 1
        began = phase.state
        body = f"Subject: charge {self.number}-{self.sent}\r\n\r\ncorps {self.sent}\r\n".encode()
        assert (await self.smtp.cmd(f"MAIL FROM:<{DOCTOR}>")).code == 250
        r = await self.smtp.cmd(f"RCPT TO:<{RCPT}>")
        if r.code != 250:
            assert (await self.smtp.cmd("RSET")).code == 250
            outcome = Outcome(f"{began}/{phase.state}", "rcpt", r)
        else:
            assert (await self.smtp.cmd("DATA")).code == 354
            await self.smtp.send(body + b".\r\n")
            r = await self.smtp.reply()
            outcome = Outcome(f"{began}/{phase.state}", "data", r, body)
        self.outcomes.append(outcome)
        return outcome


@dataclass
class Phase:
    state: str = "up"


def is_temporary_failure(reply: Reply) -> bool:
    expected = replies.INTERNAL_ERROR
    return (reply.code, reply.enhanced) == (expected.code, expected.enhanced)


@pytest.mark.slow
async def test_postgresql_stopped_under_load_gives_451_then_recovers(
    tmp_path: Path, clock: FakeClock
) -> None:
    """`pg_ctl stop -m immediate` while messages flow: every reply is 250 for a
    stored message or 451 4.3.0, never silence; after a restart on the same
    data the same sessions store again, without restarting the gateway."""
    cluster = await asyncio.to_thread(pg_cluster_or_fail)  # its own: this test kills it
    try:
        async with asyncio.timeout(60):
            url = await pg.create_database(cluster.url(), "mssante")
            settings = make_settings(tmp_path / "data", database_url=url).model_copy(
                # Every client is 127.0.0.1 and the clock stands still: no rate limit here.
                update={"limits": LimitsSettings(messages_per_minute=1_000_000)}
            )
            gw = Gateway(settings, clock=clock)
            await gw.start()
            try:
                await seed_demo(gw.store)
                await _outage(gw, cluster)
            finally:
                await gw.stop()
    finally:
        await asyncio.to_thread(cluster.remove)


async def _outage(gw: Gateway, cluster: pg.PgCluster) -> None:
    clients: list[Client] = []
    try:
        for n in range(6):
            smtp = await RawSmtp.connect("127.0.0.1", gw.smtp.port)
            clients.append(Client(n, smtp))
            assert (await smtp.cmd("EHLO client.test")).code == 250
        await _load_through_outage(gw, cluster, clients)
    finally:
        for c in clients:
            await c.smtp.close()


async def _load_through_outage(gw: Gateway, cluster: pg.PgCluster, clients: list[Client]) -> None:
    phase = Phase()
    halt = asyncio.Event()

    async def keep_sending(client: Client) -> None:
        while not halt.is_set():
            await client.send_one(phase)

    load = [asyncio.create_task(keep_sending(c)) for c in clients]

    def sessions_alive() -> None:
        for task in load:
            if task.done() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]  # a session broke: fail now

    def stored_so_far() -> int:
        sessions_alive()
        return sum(o.stage == "data" and o.reply.code == 250 for c in clients for o in c.outcomes)

    def failed_while_down(client: Client) -> int:
        sessions_alive()
        return sum(o.phase == "down/down" for o in client.outcomes)

    try:
        await until(lambda: stored_so_far() >= 30)
        phase.state = "stopping"
        await asyncio.to_thread(cluster.stop, "immediate")
        phase.state = "down"
        await until(lambda: all(failed_while_down(c) >= 3 for c in clients))
    finally:
        halt.set()
        for result in await asyncio.gather(*load, return_exceptions=True):
            if isinstance(result, BaseException):
                raise result  # a session that broke (no reply, wrong code)

    await asyncio.to_thread(cluster.start)  # crash recovery on the same data directory
    phase.state = "restarted"
    for _ in range(3):
        after = await asyncio.gather(*(c.send_one(phase) for c in clients))
        assert all(o.stage == "data" and o.reply.code == 250 for o in after), after
    for c in clients:
        assert (await c.smtp.cmd("QUIT")).code == 221

    outcomes = [o for c in clients for o in c.outcomes]
    for o in outcomes:
        assert o.reply.code == 250 or is_temporary_failure(o.reply), o
    down = [o for o in outcomes if o.phase == "down/down"]
    assert down and all(is_temporary_failure(o.reply) for o in down)
    # Nothing acknowledged is lost, byte for byte.
    acknowledged = [o for o in outcomes if o.stage == "data" and o.reply.code == 250]
    assert len(acknowledged) >= 30 + 3 * len(clients)
    for o in acknowledged:
        assert await gw.store.read_original(o.ref) == o.body
