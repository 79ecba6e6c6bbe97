"""Engines: SQLite durability settings, PostgreSQL pools, one writer at a time.

SQLite runs in WAL mode with ``synchronous=FULL`` so that a committed
transaction survives power loss (https://sqlite.org/pragma.html#pragma_synchronous),
and with pysqlite's own transaction handling switched off so that SQLAlchemy
emits ``BEGIN IMMEDIATE``: a writer takes the write lock at the start of the
transaction instead of failing half-way (SQLAlchemy "Serializable isolation /
Savepoints / Transactional DDL" recipe for pysqlite and aiosqlite).  That
lock also makes writers of several processes take turns.

PostgreSQL (``postgresql+asyncpg://user@host:port/db``) may be shared by
several gateway processes.  Each process has its single writer (writer.py),
but the audit hash chain (audit.py) needs one writer at a time across all
of them: every transaction of a writer engine first takes a
transaction-level advisory lock, held until its COMMIT or ROLLBACK, the
same role ``BEGIN IMMEDIATE`` plays on SQLite.  Readers never take it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Dialect, ExceptionContext, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.ext.asyncio import AsyncSession as AsyncSession

from mssante.store.migrations import upgrade

SessionMaker = async_sessionmaker[AsyncSession]

# The advisory lock key that writers of every process share: "mssante" in ASCII.
WRITER_LOCK = int.from_bytes(b"mssante", "big")


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def is_postgresql(url: str) -> bool:
    return make_url(url).get_backend_name() == "postgresql"


def make_engine(url: str, *, synchronous: str = "FULL", writer: bool = False) -> AsyncEngine:
    """An engine for readers, or (``writer=True``) for the single writer task.

    On SQLite readers begin deferred transactions (WAL lets them read while
    the writer writes); the writer begins IMMEDIATE and uses one connection.
    """
    if is_sqlite(url):
        return _sqlite_engine(url, synchronous=synchronous, writer=writer)
    return _server_engine(url, writer=writer)


def _sqlite_engine(url: str, *, synchronous: str, writer: bool) -> AsyncEngine:
    # hide_parameters: a database error must not write message fields
    # (subjects, addresses, INS) into the log through its SQL parameters.
    kwargs: dict[str, Any] = {"connect_args": {"timeout": 30}, "hide_parameters": True}
    if writer:
        kwargs.update(pool_size=1, max_overflow=0)
    engine = create_async_engine(url, **kwargs)
    begin = "BEGIN IMMEDIATE" if writer else "BEGIN"

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(begin)

    return engine


def _server_engine(url: str, *, writer: bool) -> AsyncEngine:
    connect_args: dict[str, Any] = {}
    if make_url(url).get_driver_name() == "asyncpg":
        # Fail a connection attempt to an unreachable server in bounded time
        # (the session answers 451 4.3.0), and name the pool in pg_stat_activity.
        connect_args = {
            "timeout": 10,
            "server_settings": {"application_name": "mssante-writer" if writer else "mssante"},
        }
    engine = create_async_engine(
        url,
        hide_parameters=True,  # as for SQLite: no message field in the logs
        # A restarted server leaves dead connections in the pool: each one is
        # tested when checked out, so the gateway recovers without a restart.
        pool_pre_ping=True,
        # The writer needs one connection; readers one per concurrent RCPT
        # look-up or reading command.
        pool_size=1 if writer else 5,
        max_overflow=0 if writer else 10,
        pool_timeout=30,
        connect_args=connect_args,
    )

    @event.listens_for(engine.sync_engine, "do_connect")
    def _connect(dialect: Dialect, _record: Any, cargs: Any, cparams: Any) -> Any:
        # A server that is down or restarting refuses or resets the connection
        # and the driver raises a bare OSError (ConnectionRefusedError,
        # ConnectionResetError, TimeoutError).  Make it a database error like
        # any other, answered 451 4.3.0: aiosmtpd takes a ConnectionResetError
        # for its own client's and would hang up without a reply.
        try:
            return dialect.connect(*cargs, **cparams)
        except OSError as exc:
            raise dialect.loaded_dbapi.OperationalError(f"cannot connect: {exc}") from exc

    if is_postgresql(url):

        @event.listens_for(engine.sync_engine, "handle_error")
        def _hide_detail(context: ExceptionContext) -> None:
            # Like hide_parameters: PostgreSQL's DETAIL repeats the values of
            # a violated key ("Key (ins)=(...) already exists"), and asyncpg
            # prints it with its exception, so a traceback in the log would
            # carry an INS or an address.
            error: BaseException | None = context.original_exception
            while error is not None:
                if getattr(error, "detail", None):
                    error.detail = None  # type: ignore[attr-defined]
                error = error.__cause__

        if writer:

            @event.listens_for(engine.sync_engine, "begin")
            def _on_begin(conn: Connection) -> None:
                # The first statement of every writer transaction, so the audit
                # chain stays linear across processes (see the module docstring).
                # Isolation must stay READ COMMITTED: each later statement then
                # sees what the previous lock holder committed.
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({WRITER_LOCK})")

    return engine


def make_sessionmaker(engine: AsyncEngine) -> SessionMaker:
    return async_sessionmaker(engine, expire_on_commit=False)


async def create_schema(engine: AsyncEngine) -> None:
    """Bring an empty database to the current schema, through the migrations."""
    await upgrade(engine)
