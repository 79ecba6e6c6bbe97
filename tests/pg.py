"""A real PostgreSQL server for the tests, started from the machine's binaries.

:class:`PgCluster` runs ``initdb`` and ``pg_ctl`` (found on PATH, else in
``/usr/lib/postgresql/<version>/bin``) in a temporary directory: the server
listens on 127.0.0.1 on a free port and on a unix socket in that
directory, with ``fsync`` on (the fault tests count on crash recovery).
PostgreSQL refuses to run as root, so as root the binaries run as the
``postgres`` user (``runuser``), who owns the directory.

``MSSANTE_TEST_PG_URL`` (``postgresql+asyncpg://user@host:port/db``, a role
that may create databases) points the tests at a server of your own
instead.  Each test gets a fresh database (:func:`fresh_database`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
from sqlalchemy.engine import make_url

ENV_URL = "MSSANTE_TEST_PG_URL"
RUN_AS = "postgres"
_names = itertools.count(1)


class PgUnavailable(RuntimeError):
    """No PostgreSQL server can be started here; the message says what to install."""


def find_bindir() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl``."""
    on_path = shutil.which("initdb")
    candidates = [Path(on_path).resolve().parent] if on_path else []
    versions = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(versions, key=lambda p: _version(p.parent.name), reverse=True)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    raise PgUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH nor in "
        "/usr/lib/postgresql/*/bin: install them (Debian: apt-get install postgresql; "
        f".ci/run does it) or set {ENV_URL} to a server of your own"
    )


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", name))


def _run_as() -> tuple[list[str], pwd.struct_passwd | None]:
    if os.geteuid() != 0:
        return [], None
    try:
        user = pwd.getpwnam(RUN_AS)
    except KeyError:
        raise PgUnavailable(
            f"the tests run as root and PostgreSQL refuses to: there is no '{RUN_AS}' user to "
            "run it as (the postgresql package creates it); install that package or run the "
            "tests as an unprivileged user"
        ) from None
    runuser = shutil.which("runuser")
    if runuser is None:
        raise PgUnavailable("the tests run as root and runuser (util-linux) is missing")
    return [runuser, "-u", RUN_AS, "--"], user


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PgCluster:
    """One throwaway cluster: ``start()``, ``stop()``, ``start()`` again on the same data."""

    def __init__(self) -> None:
        self.bindir = find_bindir()
        self._prefix, self._user = _run_as()
        self.root = Path(tempfile.mkdtemp(prefix="mssante-pg-"))
        if self._user is not None:
            os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = 0
        self.running = False
        self._initialised = False

    def _cmd(self, *args: str, timeout: float = 120) -> None:
        argv = [*self._prefix, *args]
        # cwd: the postgres user may not be allowed into the caller's directory.
        done = subprocess.run(argv, cwd=self.root, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise PgUnavailable(
                f"{' '.join(args[:2])} failed ({done.returncode}):\n{done.stdout}{done.stderr}{log}"
            )

    def start(self) -> None:
        if not self._initialised:
            # --no-sync only spares initdb's own final flush of the new files;
            # the server itself runs with fsync on.
            self._cmd(
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            )
            self._initialised = True
            for attempt in range(3):  # the free port may be taken before the server binds it
                self.port = free_port()
                try:
                    self._pg_ctl_start()
                    return
                except PgUnavailable:
                    if attempt == 2:
                        raise
        self._pg_ctl_start()  # a restart keeps its port: URLs given out still work

    def _pg_ctl_start(self) -> None:
        options = " ".join(
            [
                "-c listen_addresses=127.0.0.1",
                f"-c port={self.port}",
                f"-c unix_socket_directories={shlex.quote(str(self.root))}",
                "-c fsync=on",
                "-c synchronous_commit=on",
                "-c max_connections=200",
            ]
        )
        self._cmd(
            str(self.bindir / "pg_ctl"),
            "start",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-t",
            "60",
            "-o",
            options,
        )
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """``fast``: clean shutdown; ``immediate``: like a crash (recovery at next start)."""
        if not self.running:
            return
        self.running = False
        self._cmd(str(self.bindir / "pg_ctl"), "stop", "-D", str(self.data), "-m", mode, "-w")

    def remove(self) -> None:
        with contextlib.suppress(PgUnavailable):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"


def _asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def create_database(admin_url: str, name: str | None = None) -> str:
    """A new empty database on the server of ``admin_url``; returns its URL."""
    name = name or f"mssante_test_{os.getpid()}_{next(_names)}"
    conn = await asyncpg.connect(_asyncpg_dsn(admin_url))
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


async def drop_database(admin_url: str, url: str) -> None:
    name = make_url(url).database
    conn = await asyncpg.connect(_asyncpg_dsn(admin_url))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def fresh_database(admin_url: str) -> AsyncIterator[str]:
    url = await create_database(admin_url)
    try:
        yield url
    finally:
        await drop_database(admin_url, url)
