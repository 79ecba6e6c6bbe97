"""Schema migrations (Alembic), configured here: no ``alembic.ini`` is needed.

``models.py`` declares the schema; the revisions in ``versions/`` bring a
database to it.  They ship inside the package (package data), so an
installed mssante finds them.

- :func:`prepare_schema` (``Store.open``): an empty database gets the
  schema at once (the Quick start); one at the expected revision passes;
  anything else refuses to start with :class:`SchemaError`, which names
  the revision found, the one expected and what to run.
- :func:`upgrade` (``mssante db upgrade``), :func:`current` (``mssante db
  current``).

A new revision, for developers::

    .venv/bin/python -m mssante.store.migrations revision -m "what changed"

autogenerates it against a temporary SQLite database at head.  Review it
(types, server defaults; SQLite changes tables in batch mode) before
committing; ``tests/test_migrations.py`` fails while models and
migrations disagree, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import inspect
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

HERE = Path(__file__).resolve().parent
VERSION_TABLE = "alembic_version"
UPGRADE_COMMAND = "mssante db upgrade"

log = logging.getLogger(__name__)


class SchemaError(Exception):
    """The database schema is not the one this version of mssante needs."""

    def __init__(self, message: str, *, current: str | None, expected: str) -> None:
        super().__init__(message)
        self.current = current
        self.expected = expected


def config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    # env.py runs the migrations on this connection, inside its transaction.
    cfg.attributes["connection"] = connection
    return cfg


def script() -> ScriptDirectory:
    """The revisions shipped with this version."""
    return ScriptDirectory.from_config(config())


def head() -> str:
    """The revision this version of mssante needs."""
    revision = script().get_current_head()
    assert revision is not None, "no migration in mssante/store/migrations/versions"
    return revision


async def current(engine: AsyncEngine) -> str | None:
    """The revision the database is at (None: empty, or not versioned)."""
    async with engine.connect() as conn:
        return await conn.run_sync(_current)


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Migrate the database to ``revision``, all in one transaction.

    On the writer engine this transaction is serialised with every other
    writer (db.py), so two processes never migrate at the same time.
    """
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade, revision)


async def downgrade(engine: AsyncEngine, revision: str) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(_downgrade, revision)


async def prepare_schema(engine: AsyncEngine) -> None:
    """At start-up: create the schema of an empty database, refuse an outdated one."""
    async with engine.begin() as conn:
        await conn.run_sync(_prepare)


def _current(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def _refuse_foreign_tables(conn: Connection) -> None:
    """Tables but no revision: not ours to migrate (or made before migrations)."""
    tables = sorted(t for t in inspect(conn).get_table_names() if t != VERSION_TABLE)
    if tables and _current(conn) is None:
        shown = ", ".join(tables[:4]) + (", ..." if len(tables) > 4 else "")
        raise SchemaError(
            f"the database holds tables ({shown}) but no mssante schema revision (current: "
            f"none, expected: {head()}): `{UPGRADE_COMMAND}` did not make them and will not "
            "touch them. Use an empty database.",
            current=None,
            expected=head(),
        )


def _upgrade(conn: Connection, revision: str) -> None:
    _refuse_foreign_tables(conn)
    command.upgrade(config(conn), revision)


def _downgrade(conn: Connection, revision: str) -> None:
    command.downgrade(config(conn), revision)


def _known(revision: str) -> bool:
    try:
        return script().get_revision(revision) is not None
    except CommandError:
        return False


def _prepare(conn: Connection) -> None:
    expected = head()
    if not inspect(conn).get_table_names():
        log.info("empty database: creating the schema at revision %s", expected)
        command.upgrade(config(conn), expected)
        return
    _refuse_foreign_tables(conn)
    found = _current(conn)
    if found == expected:
        return
    if found is not None and not _known(found):
        raise SchemaError(
            f"database schema is at revision {found}, which this version of mssante does not "
            f"know (it needs {expected}): a newer mssante upgraded it; run that version",
            current=found,
            expected=expected,
        )
    raise SchemaError(
        f"database schema is at revision {found or 'none'}, this version of mssante needs "
        f"{expected}: run `{UPGRADE_COMMAND}` (with the same configuration), then start again",
        current=found,
        expected=expected,
    )
