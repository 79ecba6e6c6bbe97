"""The README's backup and restore procedure (Operations, "Data and backups"), run as written.

A real gateway stores messages on SQLite or PostgreSQL; while it runs, the
database is backed up with the documented tool (the ``sqlite3`` shell's
``.backup``, ``pg_dump -Fc``), then ``blobs/`` and the key files are copied,
and the master keys separately.  One more message arrives between the
database copy and the blob copy: its blob is in the backup, its row is not.
Everything is wiped, put back as documented (``.restore``, ``pg_restore``
into an empty database), and checked with ``mssante store check`` and
``mssante audit verify --expect-head`` as real commands: the only problem is
that blob (an orphan, which ``--remove-orphans`` deletes), and the messages
from before the backup read back byte for byte.  Restoring the database
without the blobs fails the check, naming every missing blob: the order matters.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib
import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from mssante import demo
from mssante.app import Gateway
from mssante.cli import seed_demo
from mssante.settings import Settings
from mssante.store import audit
from mssante.store.check import check_store
from mssante.store.models import Message
from mssante.store.reading import MessageNotFoundError
from tests import pg
from tests.conftest import FakeClock, make_settings
from tests.test_cli import _env
from tests.test_gateway import DOCTOR, addr, professional_message

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parent.parent / "README.md"

# What the README says to copy after the database ("then `blobs/` and the small
# key files"): everything `store.data_dir` holds besides the database and
# `spool/` (messages being received, not yet acknowledged).
DATA_FILES = ("blobs", "pseudonym.key", "verp.key", "dkim", "tls")
# The commands as the README writes them; the test runs them with its own paths.
SQLITE_BACKUP = 'sqlite3 data/mssante.db ".backup /backup/mssante.db"'
SQLITE_RESTORE = 'sqlite3 data/mssante.db ".restore /backup/mssante.db"'
PG_BACKUP = "pg_dump -Fc mssante > /backup/mssante.dump"
PG_RESTORE = "pg_restore -d mssante /backup/mssante.dump"


def _readme_bullet() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("- **Data and backups**")
    end = text.index("\n- **", start + 1)
    return " ".join(text[start:end].split())


def test_readme_documents_what_this_test_runs() -> None:
    bullet = _readme_bullet()
    for command in (SQLITE_BACKUP, SQLITE_RESTORE, PG_BACKUP, PG_RESTORE):
        assert f"`{command}`" in bullet, command
    for name in DATA_FILES:
        assert f"`{name}/`" in bullet or f"`{name}`" in bullet, name
    for step in ("mssante store check", "--remove-orphans", "mssante audit verify --expect-head"):
        assert step in bullet, step


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        argv, capture_output=True, text=True, timeout=120, check=False, **kwargs
    )


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"{done.args}: {done.returncode}\n{done.stdout}{done.stderr}"
    return done.stdout


@dataclass
class Site:
    """One installation: its data directory, master keys outside it, its database."""

    root: Path
    db_url: str
    admin_url: str | None  # PostgreSQL: the server, to drop and recreate the database
    data_dir: Path = field(init=False)
    keys_dir: Path = field(init=False)
    backup: Path = field(init=False)  # the backup server's /backup
    offline: Path = field(init=False)  # where the master keys are kept, apart

    def __post_init__(self) -> None:
        self.data_dir = self.root / "data"
        self.keys_dir = self.root / "keys"
        self.backup = self.root / "backup"
        self.offline = self.root / "offline"
        self.backup.mkdir()
        self.offline.mkdir()

    @property
    def postgresql(self) -> bool:
        return self.admin_url is not None

    def settings(self, *, create_master_key: bool = True) -> Settings:
        base = make_settings(self.data_dir, database_url=self.db_url)
        store = base.store.model_copy(
            update={"keys_dir": self.keys_dir, "create_master_key": create_master_key}
        )
        return base.model_copy(update={"store": store})

    def _libpq_url(self) -> str:
        url = make_url(self.db_url).set(drivername="postgresql")
        return url.render_as_string(hide_password=False)

    # -- backup, in the documented order --------------------------------------------------

    def backup_database(self) -> None:
        """Step 1, while the service runs."""
        if not self.postgresql:
            # sqlite3 data/mssante.db ".backup /backup/mssante.db"
            ok(
                run(
                    ["sqlite3", "data/mssante.db", f".backup {self.backup / 'mssante.db'}"],
                    cwd=self.root,
                )
            )
            return
        # pg_dump -Fc mssante > /backup/mssante.dump
        with (self.backup / "mssante.dump").open("wb") as out:
            done = subprocess.run(
                [str(pg.find_bindir() / "pg_dump"), "-Fc", self._libpq_url()],
                stdout=out,
                stderr=subprocess.PIPE,
                timeout=120,
                check=False,
            )
        assert done.returncode == 0, done.stderr.decode(errors="replace")

    def backup_data_files(self) -> None:
        """Step 2: `blobs/` and the small key files (`rsync -a`: modes and times kept)."""
        target = self.backup / "data"
        target.mkdir()
        for name in DATA_FILES:
            _copy(self.data_dir / name, target / name)

    def backup_master_keys(self) -> None:
        """Step 3: `store.keys_dir`, separately."""
        _copy(self.keys_dir, self.offline / "keys")

    # -- disaster and restore -------------------------------------------------------------

    async def wipe(self) -> None:
        shutil.rmtree(self.data_dir)
        shutil.rmtree(self.keys_dir)
        if self.admin_url is not None:
            await pg.drop_database(self.admin_url, self.db_url)
            # The empty database pg_restore expects, under the same name.
            name = make_url(self.db_url).database
            assert await pg.create_database(self.admin_url, name) == self.db_url
        assert not self.data_dir.exists() and not self.keys_dir.exists()

    def restore_database(self) -> None:
        self.data_dir.mkdir()  # the (new, empty) data directory
        if not self.postgresql:
            # sqlite3 data/mssante.db ".restore /backup/mssante.db"
            ok(
                run(
                    ["sqlite3", "data/mssante.db", f".restore {self.backup / 'mssante.db'}"],
                    cwd=self.root,
                )
            )
            return
        # pg_restore -d mssante /backup/mssante.dump
        done = run(
            [
                str(pg.find_bindir() / "pg_restore"),
                "-d",
                self._libpq_url(),
                str(self.backup / "mssante.dump"),
            ]
        )
        ok(done)
        assert done.stderr == ""

    def restore_data_files(self, *, blobs: bool = True) -> None:
        for name in DATA_FILES:
            if name != "blobs" or blobs:
                _copy(self.backup / "data" / name, self.data_dir / name)

    def restore_master_keys(self) -> None:
        _copy(self.offline / "keys", self.keys_dir)

    # -- the operator's commands ----------------------------------------------------------

    def mssante(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = _env(self.data_dir)
        env.pop("MSSANTE_MASTER_KEY", None)
        env.update(
            MSSANTE_STORE__DATABASE_URL=self.db_url,
            MSSANTE_STORE__KEYS_DIR=str(self.keys_dir),
            # Production setting (README): a key not restored stops the command
            # instead of a new one being made.
            MSSANTE_STORE__CREATE_MASTER_KEY="false",
        )
        return run([sys.executable, "-m", "mssante", *args], env=env)


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=shutil.copy2)
    else:
        shutil.copy2(src, dst)


def _tree(root: Path, *, skip: tuple[str, ...] = ()) -> dict[str, tuple[str, str]]:
    """Every file under ``root`` (but the top-level names in ``skip``): mode and SHA-256."""
    files = {}
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if path.is_file() and relative.parts[0] not in skip:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            files[str(relative)] = (oct(path.stat().st_mode), digest)
    return files


@pytest.fixture
def site(tmp_path: Path, db_url: str, request: pytest.FixtureRequest) -> Site:
    admin_url = None
    if db_url.startswith("postgresql"):
        admin_url = request.getfixturevalue("pg_admin_url")
    return Site(tmp_path, db_url, admin_url)


@pytest.fixture
async def service(site: Site, clock: FakeClock) -> AsyncIterator[Gateway]:
    gw = Gateway(site.settings(), clock=clock)
    await gw.start()
    await seed_demo(gw.store)
    try:
        yield gw
    finally:
        await gw.stop()  # a second stop (the tests stop it themselves) does nothing


async def deliver(gw: Gateway, ins: str, marker: str) -> tuple[str, bytes]:
    """One message over SMTP; its ref and its bytes as sent."""
    msg = professional_message(
        [addr(ins)], subject=f"Bilan {marker}", pdf=bytes(range(256)) * 40 + marker.encode()
    )
    raw = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.smtp.port, start_tls=False) as c:
        errors, text = await c.sendmail(DOCTOR, [addr(ins)], raw)
    assert errors == {} and text.startswith("2.0.0"), text
    ref = re.search(r"ref (\S+) ", text)
    assert ref is not None, text
    return ref.group(1), raw


async def blob_key(gw: Gateway, ref: str) -> str:
    async with gw.store.reads() as s:
        key = await s.scalar(select(Message.blob_key).where(Message.ref == ref))
    assert key is not None
    return key


async def audit_head(gw: Gateway) -> str:
    """What `mssante audit head` prints (tests/test_store_check.py runs the command)."""
    async with gw.store.reads() as session:
        head = await audit.head(session)
    assert re.fullmatch(r"[0-9a-f]{64}", head) and head != audit.GENESIS, head
    return head


async def test_backup_while_running_then_restore(site: Site, service: Gateway) -> None:
    sent = [
        await deliver(service, ins, f"m{i}")
        for i, ins in enumerate((demo.ACTIVATED, demo.CREATED_EMAIL, demo.MINOR))
    ]
    # The head kept before the backup is in it; a later one cannot be.
    head = await audit_head(service)

    await asyncio.to_thread(site.backup_database)
    late_ref, _ = await deliver(service, demo.ACTIVATED, "after the database copy")
    late_blob = await blob_key(service, late_ref)
    later_head = await audit_head(service)
    assert later_head != head
    await asyncio.to_thread(site.backup_data_files)
    await asyncio.to_thread(site.backup_master_keys)
    await service.stop()

    skip = ("mssante.db", "mssante.db-wal", "mssante.db-shm", "spool")
    before = _tree(site.data_dir, skip=skip)
    keys_before = _tree(site.keys_dir)
    assert before and keys_before
    await site.wipe()

    site.restore_database()
    site.restore_data_files()
    site.restore_master_keys()
    # Nothing the service had made is missing (the README's list is complete).
    assert _tree(site.data_dir, skip=skip) == before
    assert _tree(site.keys_dir) == keys_before

    # Read-only commands: run together (each starts a Python process).
    found, verified, lost = await asyncio.gather(
        asyncio.to_thread(site.mssante, "store", "check"),
        asyncio.to_thread(site.mssante, "audit", "verify", "--expect-head", head),
        asyncio.to_thread(site.mssante, "audit", "verify", "--expect-head", later_head),
    )
    assert found.returncode == 1, found.stdout + found.stderr
    problems = [line for line in found.stdout.splitlines() if line.startswith("PROBLEM")]
    assert problems == [f"PROBLEM orphan blob {late_blob} (no message row)"]
    summary = re.search(
        r"^3 messages, 4 blobs, 0 erased, (\d+) audit events: 1 problems$",
        found.stdout,
        re.MULTILINE,
    )
    assert summary is not None, found.stdout
    events = int(summary.group(1))
    assert ok(verified).strip() == f"{events} events: chain intact"
    # A head kept after the database copy names events the backup lost.
    assert lost.returncode == 1, lost.stdout + lost.stderr
    assert f"PROBLEM expected head {later_head} is not in the trail" in lost.stdout

    fixed = site.mssante("store", "check", "--remove-orphans")
    removed, fixed_summary = ok(fixed).splitlines()
    assert removed == "removed 1 orphan blobs"
    # (its counts are those found before the removal)
    assert fixed_summary.startswith("3 messages, ") and fixed_summary.endswith(": ok")
    assert not (site.data_dir / "blobs" / late_blob[:2] / late_blob[2:4] / late_blob).exists()
    assert sum(1 for p in (site.data_dir / "blobs").glob("*/*/*") if p.is_file()) == 3

    # Start: the messages from before the backup, byte for byte; the service goes on.
    settings = site.settings(create_master_key=False)
    gw = Gateway(settings, clock=service.clock)
    await gw.start()
    try:
        for ref, raw in sent:
            assert await gw.store.read_original(ref) == raw
        with pytest.raises(MessageNotFoundError):
            await gw.store.read_original(late_ref)  # acknowledged after the backup: lost
        ref, raw = await deliver(gw, demo.ACTIVATED, "after the restore")
        assert await gw.store.read_original(ref) == raw
        report = await check_store(gw.store.reads, gw.store.blobs, gw.store.keyring)
        assert report.problems == []
        assert (report.messages, report.blobs) == (4, 4)
    finally:
        await gw.stop()


async def test_database_without_blobs_fails_the_check(site: Site, service: Gateway) -> None:
    sent = [await deliver(service, ins, ins) for ins in (demo.ACTIVATED, demo.CORSICAN)]
    blobs = [await blob_key(service, ref) for ref, _ in sent]
    await asyncio.to_thread(site.backup_database)
    await asyncio.to_thread(site.backup_data_files)
    await asyncio.to_thread(site.backup_master_keys)
    await service.stop()
    await site.wipe()

    site.restore_database()
    site.restore_data_files(blobs=False)
    site.restore_master_keys()

    found = site.mssante("store", "check")
    assert found.returncode == 1, found.stdout + found.stderr
    problems = [line for line in found.stdout.splitlines() if line.startswith("PROBLEM")]
    assert len(problems) == 2
    for (ref, _), key in zip(sent, blobs, strict=True):
        assert any(
            re.fullmatch(rf"PROBLEM message {ref} \(id \d+\): blob {key} missing", p)
            for p in problems
        ), (ref, key, problems)
    assert re.search(r"^2 messages, 0 blobs, .*: 2 problems$", found.stdout, re.MULTILINE)
