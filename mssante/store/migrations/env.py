"""Alembic environment, run by :mod:`mssante.store.migrations` on its connection.

There is no ``alembic.ini`` and no URL here: the caller (``Store.open``,
``mssante db upgrade``, the ``revision`` helper) opens the connection
through the same engine as the server, the writer's, and passes it in
``config.attributes``.  Migrations run inside the caller's transaction.
"""

from __future__ import annotations

from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext

from mssante.store.models import Base, UtcDateTime

config = context.config


def render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    # Revisions must not import models.py, which keeps changing after them:
    # UtcDateTime is a timezone-aware DATETIME / TIMESTAMPTZ in the database.
    if type_ == "type" and isinstance(obj, UtcDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def run_migrations() -> None:
    connection = config.attributes.get("connection")
    if connection is None or context.is_offline_mode():
        raise RuntimeError(
            "run migrations through mssante (`mssante db upgrade`), which passes the connection"
        )
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite alters a table by copying it; batch mode writes that for us.
        render_as_batch=True,
        render_item=render_item,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
