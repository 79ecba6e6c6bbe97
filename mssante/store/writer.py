"""The single writer: every change to the database goes through here.

Jobs are coroutines taking the session.  The writer takes all the jobs
waiting (up to ``max_batch``), runs them in one transaction and commits
once (group commit): under load one fsync serves many messages, and each
caller still resumes only after the commit that holds its own job.

A batch job (``run_batched``) is one item for a function that takes a
list: consecutive items for the same function run in one call, so storing
twenty messages costs the statements of one (inbox.py).

If a job fails, the batch is rolled back and each of its jobs is retried
alone, so one bad job fails only its own caller.  Jobs must therefore be
plain database work with no side effect outside the session.

One writer per process also serialises the audit chain (audit.py).  Across
processes sharing a database, each transaction of the writer engine first
takes a lock: ``BEGIN IMMEDIATE`` on SQLite, an advisory lock on PostgreSQL
(db.py), so writers of different processes take turns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from mssante.metrics import Metrics
from mssante.store.db import SessionMaker

T = TypeVar("T")
ItemT = TypeVar("ItemT")
Job = Callable[[AsyncSession], Awaitable[Any]]
BatchJob = Callable[[AsyncSession, list[ItemT]], Awaitable[list[T]]]

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    job: Job | None
    batch: BatchJob[Any, Any] | None = None
    item: Any = None
    future: asyncio.Future[Any] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Writer:
    def __init__(
        self, sessions: SessionMaker, *, max_batch: int = 64, metrics: Metrics | None = None
    ) -> None:
        self._sessions = sessions
        self._max_batch = max_batch
        self._metrics = metrics or Metrics()
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.jobs = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="store-writer")

    async def stop(self) -> None:
        """Finish the jobs already queued, then stop."""
        if self._task is None:
            return
        await self._queue.join()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def run(self, job: Callable[[AsyncSession], Awaitable[T]]) -> T:
        """Run ``job`` in a transaction; return once that transaction committed."""
        return await self._submit(_Pending(job))  # type: ignore[no-any-return]

    async def run_batched(self, job: BatchJob[ItemT, T], item: ItemT) -> T:
        """Run ``job`` on ``item`` and the other items for ``job`` waiting with it.

        ``job`` returns one result per item, in order.  Return once the
        transaction committed.
        """
        return await self._submit(_Pending(None, job, item))  # type: ignore[no-any-return]

    async def _submit(self, pending: _Pending) -> Any:
        if self._task is None:
            raise RuntimeError("store writer is not running")
        self._queue.put_nowait(pending)
        return await asyncio.shield(pending.future)

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._commit(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _commit(self, batch: list[_Pending]) -> None:
        try:
            results = await self._transaction(batch)
        except Exception as exc:
            if len(batch) == 1:
                _fail(batch[0], exc)
                return
            log.warning(
                "batch of %d failed (%s); retrying jobs one by one", len(batch), type(exc).__name__
            )
            for pending in batch:
                try:
                    (result,) = await self._transaction([pending])
                except Exception as one_exc:
                    _fail(pending, one_exc)
                else:
                    _succeed(pending, result)
            return
        self.batches += 1
        self.jobs += len(batch)
        for pending, result in zip(batch, results, strict=True):
            _succeed(pending, result)

    async def _transaction(self, batch: list[_Pending]) -> list[Any]:
        started = time.perf_counter()
        async with self._sessions() as session, session.begin():
            results = await self._jobs(session, batch)
            committing = time.perf_counter()
        done = time.perf_counter()  # committed
        m = self._metrics
        m.db_transaction.observe(done - started)
        m.db_commit.observe(done - committing)
        m.db_batch_jobs.observe(len(batch))
        return results

    async def _jobs(self, session: AsyncSession, batch: list[_Pending]) -> list[Any]:
        """Run the batch's jobs in ``session``; one result per job."""
        results: list[Any] = []
        i = 0
        while i < len(batch):
            pending = batch[i]
            if pending.job is not None:
                results.append(await pending.job(session))
                i += 1
                continue
            assert pending.batch is not None
            group = [pending]
            while i + len(group) < len(batch) and batch[i + len(group)].batch == pending.batch:
                group.append(batch[i + len(group)])
            out = await pending.batch(session, [p.item for p in group])
            if len(out) != len(group):
                raise RuntimeError("batch job returned a wrong number of results")
            results.extend(out)
            i += len(group)
        return results


def _succeed(pending: _Pending, result: Any) -> None:
    if not pending.future.done():
        pending.future.set_result(result)


def _fail(pending: _Pending, exc: BaseException) -> None:
    if not pending.future.done():
        pending.future.set_exception(exc)
