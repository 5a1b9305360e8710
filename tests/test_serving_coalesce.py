"""Coalescing of /recommend queries: requests queued behind a running model call share the next one."""

from __future__ import annotations

import asyncio
import threading

import pytest

from serving.coalesce import Coalescer


class Model:
    """Doubles numbers; the first call blocks until released, so the test decides what queues behind it."""

    def __init__(self):
        self.calls: list[tuple[object, list]] = []
        self.release = threading.Event()

    def __call__(self, key, queries: list) -> list:
        self.calls.append((key, list(queries)))
        if len(self.calls) == 1:
            self.release.wait(timeout=60)
        if "bad" in queries:
            raise ValueError("bad query")
        return [q * 2 for q in queries]


async def _queued(coalescer: Coalescer, n: int) -> None:
    """Yields to the loop until ``n`` submissions wait behind the running call (no clock involved)."""
    for _ in range(100_000):
        if coalescer.waiting == n:
            return
        await asyncio.sleep(0)
    pytest.fail(f"{coalescer.waiting} submissions queued, expected {n}")


def _run(model: Model, max_queries: int, submissions: list[tuple[object, list]]) -> list:
    async def main():
        coalescer = Coalescer(model, max_queries)
        first = asyncio.ensure_future(coalescer.submit(*submissions[0]))
        while not model.calls:
            await asyncio.sleep(0)
        rest = [asyncio.ensure_future(coalescer.submit(*s)) for s in submissions[1:]]
        await _queued(coalescer, len(rest))
        model.release.set()
        answers = await asyncio.gather(first, *rest, return_exceptions=True)
        await coalescer.close()
        return answers

    return asyncio.run(main())


def test_queries_waiting_behind_a_call_share_the_next_one():
    model = Model()
    answers = _run(model, 64, [(None, [1])] + [(None, [i, i + 100]) for i in range(2, 6)])
    assert answers == [[2], [4, 204], [6, 206], [8, 208], [10, 210]]
    assert [q for _, q in model.calls] == [[1], [2, 102, 3, 103, 4, 104, 5, 105]]


def test_a_call_takes_at_most_max_queries():
    model = Model()
    answers = _run(model, 4, [(None, [0])] + [(None, [i]) for i in range(1, 10)] + [(None, list(range(6)))])
    assert answers == [[2 * i] for i in range(10)] + [[0, 2, 4, 6, 8, 10]]
    assert [len(q) for _, q in model.calls] == [1, 4, 4, 1, 6]  # a submission above the bound runs alone


def test_submissions_for_different_models_are_never_mixed():
    model = Model()
    a, b = object(), object()
    answers = _run(model, 64, [(a, [1]), (a, [2]), (b, [3]), (b, [4]), (a, [5])])
    assert answers == [[2], [4], [6], [8], [10]]
    assert [(key, q) for key, q in model.calls] == [(a, [1]), (a, [2]), (b, [3, 4]), (a, [5])]


def test_a_failing_query_fails_only_its_own_request():
    model = Model()
    answers = _run(model, 64, [(None, [1]), (None, [2]), (None, ["bad"]), (None, [3])])
    assert answers[:2] == [[2], [4]] and answers[3] == [6]
    assert isinstance(answers[2], ValueError) and str(answers[2]) == "bad query"
    assert [q for _, q in model.calls] == [[1], [2, "bad", 3], [2], ["bad"], [3]]
