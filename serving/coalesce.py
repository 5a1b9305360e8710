"""Requests that arrive while the model is busy are answered together, by one model call.

Scoring one query against a large catalog reads every item's row; scoring several queries reads them once. A
``Coalescer`` runs one group at a time in a worker thread. Requests that arrive meanwhile wait in a queue, and
the next group takes all of them (up to ``max_queries``). A lone request waits for nobody, so at concurrency 1
nothing changes, and under load the model runs fewer, larger calls (as Triton's and TorchServe's dynamic batching,
with no delay window).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable, Generic, TypeVar

import anyio

Query, Answer = TypeVar("Query"), TypeVar("Answer")


@dataclass
class _Submission(Generic[Query]):
    key: object  # submissions with the same key may share a call (e.g. the same loaded model)
    queries: list
    answer: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Coalescer(Generic[Query, Answer]):
    """Answers lists of queries with ``run(key, queries) -> answers`` (one answer per query, in order), grouping the
    lists that share a key and arrive while a call runs.

    Args:
        run: the model call; it runs in a worker thread, one call at a time.
        max_queries: most queries of one call (a submission larger than this runs alone).

    A group whose call raises is answered submission by submission, so a query that fails fails only its own
    request.

    Example:
        >>> coalescer = Coalescer(lambda key, queries: [q * 2 for q in queries], max_queries=64)
        >>> asyncio.run(coalescer.submit(None, [1, 2]))  # doctest: +SKIP
        [2, 4]
    """

    def __init__(self, run: Callable[[object, list[Query]], list[Answer]], max_queries: int = 64):
        self.run, self.max_queries = run, max_queries
        self._queue: asyncio.Queue[_Submission] | None = None
        self._worker: asyncio.Task | None = None

    @property
    def waiting(self) -> int:
        """Submissions queued behind the running call."""
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, key: object, queries: list[Query]) -> list[Answer]:
        """The answers of ``queries``, computed alone or together with other waiting submissions of ``key``."""
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._serve())
        submission = _Submission(key, list(queries))
        await self._queue.put(submission)
        return await submission.answer

    async def close(self) -> None:
        """Stops the worker (waiting submissions are cancelled)."""
        if self._worker is not None:
            self._worker.cancel()
            while self._queue is not None and not self._queue.empty():
                self._queue.get_nowait().answer.cancel()

    async def _serve(self) -> None:
        held: _Submission | None = None  # a submission of another key, first in the next group
        while True:
            first = held or await self._queue.get()
            group, held, size = [first], None, len(first.queries)
            while not self._queue.empty() and size < self.max_queries:
                nxt = self._queue.get_nowait()
                if nxt.key is not first.key or size + len(nxt.queries) > self.max_queries:
                    held = nxt
                    break
                group.append(nxt)
                size += len(nxt.queries)
            await self._answer(group)

    async def _answer(self, group: list[_Submission]) -> None:
        live = [s for s in group if not s.answer.done()]  # a client that went away cancelled its future
        if not live:
            return
        try:
            answers = await self._call(live[0].key, [q for s in live for q in s.queries])
        except Exception as error:  # noqa: BLE001 (handed to the requests that caused it)
            if len(live) == 1:
                _fail(live[0], error)
            else:
                for submission in live:  # find the culprit: answer each on its own
                    await self._alone(submission)
            return
        start = 0
        for submission in live:
            if not submission.answer.done():
                submission.answer.set_result(answers[start:start + len(submission.queries)])
            start += len(submission.queries)

    async def _alone(self, submission: _Submission) -> None:
        try:
            answers = await self._call(submission.key, submission.queries)
        except Exception as error:  # noqa: BLE001 (handed to the request that caused it)
            _fail(submission, error)
            return
        if not submission.answer.done():
            submission.answer.set_result(answers)

    async def _call(self, key: object, queries: list) -> list:
        answers = await anyio.to_thread.run_sync(self.run, key, queries)
        if len(answers) != len(queries):
            raise RuntimeError(f"the model call answered {len(answers)} of {len(queries)} queries")
        return answers


def _fail(submission: _Submission, error: Exception) -> None:
    if not submission.answer.done():
        submission.answer.set_exception(error)
