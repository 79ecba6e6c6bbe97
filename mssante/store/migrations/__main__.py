"""Developer tool: ``python -m mssante.store.migrations revision -m "what changed"``.

Autogenerates the next revision by comparing ``models.py`` with a
temporary SQLite database migrated to head, and formats it with ruff.
Review the file it writes.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from alembic import command
from sqlalchemy.engine import Connection

from mssante.store.db import make_engine
from mssante.store.migrations import config, script, upgrade


def _revision(conn: Connection, message: str) -> None:
    rev_id = f"{len(list(script().walk_revisions())) + 1:04d}"
    written = command.revision(config(conn), message=message, autogenerate=True, rev_id=rev_id)
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff and written is not None and not isinstance(written, list):
        path = written.path
        subprocess.run([ruff, "check", "--fix", "--quiet", path], check=False)  # noqa: S603
        subprocess.run([ruff, "format", "--quiet", path], check=False)  # noqa: S603


async def _main(message: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(f"sqlite+aiosqlite:///{Path(tmp) / 'head.db'}", writer=True)
        try:
            await upgrade(engine)
            async with engine.begin() as conn:
                await conn.run_sync(_revision, message)
        finally:
            await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m mssante.store.migrations")
    sub = parser.add_subparsers(dest="command", required=True)
    revision = sub.add_parser("revision", help="autogenerate the next revision")
    revision.add_argument("-m", "--message", required=True)
    args = parser.parse_args()
    asyncio.run(_main(args.message))


if __name__ == "__main__":
    main()
