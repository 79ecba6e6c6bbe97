"""Directory benchmark: importing N patients, then RCPT status look-ups among them.

Run with ``.venv/bin/python bench/directory.py [--rows N] [--database sqlite,postgresql]``;
BENCHMARKS.md "Directory" has the latest results.

1. A synthetic CSV of N patients (default 10,000,000) is written once
   (:func:`generate_csv`: valid INS with their keys, some Corsican; 60 %
   created, 30 % activated, 5 % opposed, 5 % closed; e-mail addresses and
   postal blocks; every tenth row a minor with one or two representatives,
   some helpers, one minor in 1000 named before its parent).
2. For each database (SQLite in a temporary directory, WAL and
   ``synchronous=FULL`` as served; PostgreSQL in a throwaway cluster as in
   tests/pg.py, fsync on), ``import_patients`` runs twice on the file: the
   first import, then the same file again (idempotent: everything
   unchanged).  Each is timed end to end (check pass, scratch database,
   writes and commits) and reported in rows/s.
3. Then ``Directory.lookup`` (what RCPT TO calls) for random existing and
   absent INS, in-process: sequentially, then from ``--concurrency`` tasks
   at once; p50 / p99 / p99.9 of each call's time.  Bounded by
   ``--lookups`` and ``--seconds`` per phase.

Not measured here: RCPT over real SMTP against a started gateway (the
look-up is one part of it; bench/throughput.py measures whole messages).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import os
import platform
import random
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere: import mssante, tests.pg

from mssante.routing.ins import compute_key  # noqa: E402

console = Console()
FIELDS = (
    "ins",
    "status",
    "activation_email",
    "insurer_email",
    "given_name",
    "family_name",
    "birth_date",
    "postal_address",
    "representatives",
    "helpers",
)
GIVEN = ("Camille", "Léa", "Louis", "Jade", "Hugo", "Chloé", "Noël", "Inès", "Paul", "Zoé")
ASCII = ("camille", "lea", "louis", "jade", "hugo", "chloe", "noel", "ines", "paul", "zoe")
FAMILY = ("Martin", "Bernard", "Dubois", "Thomas", "Robert", "Richard", "Petit", "Durand")
STREETS = ("rue des Lilas", "avenue de la République", "allée Verte", "boulevard Haussmann")
DOMAINS = (*(f"assure{n}.fr" for n in range(40)), "exämple.fr", "Example.COM")


def patient_ins(i: int) -> str:
    """The INS of row ``i``: unique for i < 92,000,000, keys correct, some Corsican."""
    block = i // 1_000_000
    month = block + 1 if block < 12 else block + 8  # 01-12, then 20-99 (unknown month)
    if i % 997 == 5:
        # Sex digit 7 (NIA) is used by no other row; department 2A; month and
        # the six low digits of i keep it unique.
        body = f"7{i % 100:02d}{month:02d}2A{i % 1_000_000:06d}"
    else:
        body = f"{1 + i % 2}{i % 100:02d}{month:02d}{i % 100_000_000:08d}"
    return f"{body}{compute_key(body):02d}"


def absent_ins(i: int) -> str:
    """A valid INS that no generated row has (sex digit 8)."""
    body = f"8{i % 100:02d}{i // 1_000_000 % 12 + 1:02d}{i % 100_000_000:08d}"
    return f"{body}{compute_key(body):02d}"


def generate_csv(path: Path, rows: int) -> None:
    """A realistic directory: 60 % created, 30 % activated, 5 % opposed, 5 % closed;
    every tenth row a minor with one or two representatives (the row before it,
    or for one minor in 1000 the row after it) and sometimes a helper."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        out.writerow(FIELDS)
        for i in range(rows):
            kind = i % 20
            status = (
                "activated"
                if kind < 6
                else "opposed"
                if kind == 6
                else "closed"
                if kind == 7
                else "created"
            )
            domain = DOMAINS[i % len(DOMAINS)]
            given = GIVEN[i % len(GIVEN)]
            family = FAMILY[i // 7 % len(FAMILY)]
            # Mostly ASCII addresses (as most are); one in 100 keeps its accent.
            local = given.lower() if i % 100 == 1 else ASCII[i % len(GIVEN)]
            activation = f"{local}.{family.lower()}{i}@{domain}" if kind < 6 else ""
            insurer = f"p{i}@{domain}" if kind % 3 else ""
            address = f"{i % 200 + 1} {STREETS[i % len(STREETS)]} | {75001 + i % 20} Paris"
            if kind == 11:
                address = ""
            representatives = helpers = ""
            if i % 10 == 9 and i + 1 < rows:
                adult = i + 1 if i % 1000 == 999 else i - 1
                representatives = patient_ins(adult)
                if i % 30 == 9:
                    representatives += f";{patient_ins(i - 2)}"
                if i % 50 == 19:
                    helpers = patient_ins(i - 3)
            out.writerow(
                (
                    patient_ins(i),
                    status,
                    activation,
                    insurer,
                    given,
                    family,
                    f"{1930 + i % 90}-{i % 12 + 1:02d}-{i % 28 + 1:02d}",
                    address,
                    representatives,
                    helpers,
                )
            )


# --- measuring -------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (values sorted); NaN when empty."""
    if not values:
        return float("nan")
    pos = (len(values) - 1) * q
    low = int(pos)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (pos - low)


@dataclass
class Result:
    database: str
    rows: int
    import_s: float = float("nan")
    reimport_s: float = float("nan")
    counts: str = ""
    lookups: dict[str, list[float]] = field(default_factory=dict)  # phase -> sorted ms
    notes: list[str] = field(default_factory=list)


async def run_imports(url: str, path: Path, rows: int, result: Result, tmp: Path) -> None:
    from mssante.clock import SystemClock
    from mssante.store.db import create_schema, make_engine, make_sessionmaker
    from mssante.store.patient_import import import_patients

    engine = make_engine(url, writer=True)
    try:
        await create_schema(engine)
        sessions = make_sessionmaker(engine)
        for label in ("import", "re-import"):
            started = time.perf_counter()
            report = await import_patients(sessions, path, clock=SystemClock(), scratch_dir=tmp)
            elapsed = time.perf_counter() - started
            console.print(
                f"  {label}: {elapsed:.1f} s, {rows / elapsed:,.0f} rows/s "
                f"(created {report.created:,}, updated {report.updated:,}, "
                f"unchanged {report.unchanged:,}, invalid {len(report.errors):,})"
            )
            if report.errors or not report.imported:
                raise SystemExit(f"unexpected invalid rows: {report.errors[:5]}")
            if label == "import":
                result.import_s = elapsed
                expected = (rows, 0, 0)
            else:
                result.reimport_s = elapsed
                expected = (0, 0, rows)
            got = (report.created, report.updated, report.unchanged)
            if got != expected:
                raise SystemExit(f"{label}: created/updated/unchanged {got}, expected {expected}")
        result.counts = f"{rows:,} created, then {rows:,} unchanged"
    finally:
        await engine.dispose()


async def run_lookups(
    url: str, rows: int, result: Result, *, lookups: int, concurrency: int, seconds: float
) -> None:
    from mssante.store.db import make_engine
    from mssante.store.directory import Directory

    engine = make_engine(url)
    directory = Directory(engine)
    rng = random.Random(5)
    try:
        # Warm-up: the connection (pool) and a few pages; not measured.
        for _ in range(200):
            await directory.lookup(patient_ins(rng.randrange(rows)))

        async def one(ins: str, expect: bool, times: list[float]) -> None:
            started = time.perf_counter_ns()
            entry = await directory.lookup(ins)
            times.append((time.perf_counter_ns() - started) / 1e6)
            if (entry is not None) != expect:
                raise SystemExit(f"look-up of {ins}: found={entry is not None}, expected {expect}")

        def targets() -> Iterator[tuple[str, bool]]:
            while True:
                i = rng.randrange(rows)
                yield (patient_ins(i), True) if rng.random() < 0.8 else (absent_ins(i), False)

        # Sequential: one look-up at a time, as one SMTP session's RCPT.
        times: dict[str, list[float]] = {"existing": [], "absent": []}
        deadline = time.monotonic() + seconds
        for _, (ins, expect) in zip(range(lookups), targets(), strict=False):
            await one(ins, expect, times["existing" if expect else "absent"])
            if time.monotonic() > deadline:
                result.notes.append("sequential look-ups stopped by --seconds")
                break
        result.lookups["sequential, existing"] = sorted(times["existing"])
        result.lookups["sequential, absent"] = sorted(times["absent"])

        # Concurrent: `concurrency` tasks (SMTP sessions) looking up at once.
        both: list[float] = []
        source = targets()
        deadline = time.monotonic() + seconds
        remaining = lookups

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0 and time.monotonic() < deadline:
                remaining -= 1
                ins, expect = next(source)
                await one(ins, expect, both)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        if remaining > 0:
            result.notes.append(f"{concurrency}-task look-ups stopped by --seconds")
        result.lookups[f"{concurrency} tasks, both"] = sorted(both)
    finally:
        directory.close()
        await engine.dispose()


@contextlib.contextmanager
def postgresql(tmp: Path) -> Iterator[tuple[str, str]]:
    """A throwaway cluster (tests/pg.py) with one database; yields (url, description)."""
    from tests import pg

    saved = tempfile.tempdir
    tempfile.tempdir = str(tmp.parent)  # the postgres user cannot enter our 0700 tmp dir
    try:
        cluster = pg.PgCluster()
    finally:
        tempfile.tempdir = saved
    try:
        cluster.start()
        url = asyncio.run(pg.create_database(cluster.url(), "bench_directory"))
        version = subprocess.run(
            [str(cluster.bindir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        yield url, f"{version}, throwaway cluster in {cluster.root}, fsync=on (tests/pg.py)"
    finally:
        if (cluster.data / "postmaster.pid").exists():
            cluster.running = True
        cluster.remove()


# --- report ----------------------------------------------------------------


def machine() -> str:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"nproc={os.cpu_count()}  cpu={cpu}  python={platform.python_implementation()} "
        f"{platform.python_version()}  kernel={platform.release()}  load={load}"
    )


def _f(value: float, digits: int = 3) -> str:
    return "-" if value != value else f"{value:.{digits}f}"


def tables(results: Sequence[Result]) -> tuple[Table, Table]:
    imports = Table(title="Import (mssante patients import, in-process)")
    for name in (
        "database",
        "rows",
        "import s",
        "import rows/s",
        "re-import s",
        "re-import rows/s",
    ):
        imports.add_column(name, justify="left" if name == "database" else "right")
    for r in results:
        imports.add_row(
            r.database,
            f"{r.rows:,}",
            _f(r.import_s, 1),
            f"{r.rows / r.import_s:,.0f}" if r.import_s == r.import_s else "-",
            _f(r.reimport_s, 1),
            f"{r.rows / r.reimport_s:,.0f}" if r.reimport_s == r.reimport_s else "-",
        )
    lookups = Table(title="Directory.lookup (RCPT status look-up), ms per call")
    for name in ("database", "phase", "n", "p50", "p99", "p99.9", "max"):
        lookups.add_column(name, justify="left" if name in ("database", "phase") else "right")
    for r in results:
        for phase, times in r.lookups.items():
            lookups.add_row(
                r.database,
                phase,
                f"{len(times):,}",
                _f(percentile(times, 0.5)),
                _f(percentile(times, 0.99)),
                _f(percentile(times, 0.999)),
                _f(times[-1] if times else float("nan")),
            )
    return imports, lookups


# --- main ------------------------------------------------------------------

DATABASES = ("sqlite", "postgresql")


def _databases(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names or any(n not in DATABASES for n in names):
        raise argparse.ArgumentTypeError(f"among {', '.join(DATABASES)}; got {text!r}")
    return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/directory.py",
        description="Patient directory: import rate and RCPT look-up latency.",
    )
    parser.add_argument("--rows", type=int, default=10_000_000, help="patients in the file")
    parser.add_argument("--database", type=_databases, default=list(DATABASES))
    parser.add_argument("--lookups", type=int, default=100_000, help="look-ups per phase")
    parser.add_argument("--concurrency", type=int, default=50, help="concurrent look-up tasks")
    parser.add_argument(
        "--seconds", type=float, default=120.0, help="time cap of each look-up phase"
    )
    parser.add_argument(
        "--csv", type=Path, default=None, help="reuse (or keep) the generated file at this path"
    )
    parser.add_argument(
        "--tmpdir", type=Path, default=None, help="where the databases go (default: $TMPDIR)"
    )
    args = parser.parse_args(argv)
    if args.rows < 100:
        parser.error("--rows must be at least 100")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    console.print(f"[bold]command[/]  {shlex.join([sys.executable, *sys.argv])}")
    console.print(f"[bold]machine[/]  {machine()}")
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="mssante-bench-dir-", dir=args.tmpdir) as name:
        tmp = Path(name)
        path = args.csv or tmp / "patients.csv"
        if not path.exists():
            started = time.perf_counter()
            generate_csv(path, args.rows)
            console.print(
                f"[bold]file[/]     {path}: {args.rows:,} rows, "
                f"{path.stat().st_size / 1e6:,.0f} MB, written in "
                f"{time.perf_counter() - started:.0f} s"
            )
        else:
            console.print(f"[bold]file[/]     {path} (reused; must hold --rows rows)")
        for database in args.database:
            result = Result(database, args.rows)
            results.append(result)
            with contextlib.ExitStack() as stack:
                if database == "sqlite":
                    url = f"sqlite+aiosqlite:///{tmp / 'mssante.db'}"
                    console.print(f"[bold]{database}[/]  {url} (WAL, synchronous=FULL)")
                else:
                    url, description = stack.enter_context(postgresql(tmp))
                    console.print(f"[bold]{database}[/]  {description}")
                asyncio.run(run_imports(url, path, args.rows, result, tmp))
                asyncio.run(
                    run_lookups(
                        url,
                        args.rows,
                        result,
                        lookups=args.lookups,
                        concurrency=args.concurrency,
                        seconds=args.seconds,
                    )
                )
            if database == "sqlite":
                for suffix in ("", "-wal", "-shm"):
                    (tmp / f"mssante.db{suffix}").unlink(missing_ok=True)
    imports, lookups = tables(results)
    console.print(imports)
    console.print(lookups)
    for r in results:
        for note in r.notes:
            console.print(f"{r.database}: {note}")
    console.print(f"[bold]machine[/]  {machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
