"""Calls made during one pass of the event loop, sent to the store as one.

The batcher wakes every step of a batch in the same pass of the event loop, so
their store writes are issued together; requests that arrived together issue
their reads together. A :class:`Coalescer` turns each such wave of per-session
calls into one call of a batched function (one Redis round trip) and hands each
caller its own result, so the session service keeps its per-step code and the
store pays per batch.

How a wave is cut: the first call of a pass creates a task; everything queued
before that task first runs (the rest of the pass, and callers the pass woke)
goes out in it, in chunks of at most ``limit``. Calls made while a wave is in
flight start the next wave at once: waves overlap (each takes its own
connection from the pool) instead of queueing behind a slow one.

A failure of the batched call (the store is down) fails every call of its chunk;
a per-call failure (an exception in the results list) fails that call only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Call = TypeVar("Call")
Result = TypeVar("Result")


class Coalescer(Generic[Call, Result]):
    """``await coalescer(call)`` runs ``call`` as part of one ``send(calls)`` per wave.

    Args:
        send: runs a chunk of calls at once; returns one result (or exception) per call,
            in order.
        limit: most calls in one ``send`` (a longer wave is sent as several, concurrently).

    Raises:
        ValueError: ``limit`` < 1.
    """

    def __init__(
        self,
        send: Callable[[Sequence[Call]], Awaitable[Sequence[Result | BaseException]]],
        limit: int = 256,
    ) -> None:
        if limit < 1:
            raise ValueError(f"Coalescer needs limit >= 1. Received: limit={limit!r}")
        self._send, self._limit = send, limit
        self._calls: list[Call] = []
        self._futures: list[asyncio.Future[Result]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, call: Call) -> asyncio.Future[Result]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        if not self._calls:
            task = loop.create_task(self._wave())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._calls.append(call)
        self._futures.append(future)
        return future

    async def _wave(self) -> None:
        calls, futures = self._calls, self._futures
        self._calls, self._futures = [], []
        limit = self._limit
        if len(calls) <= limit:
            await self._chunk(calls, futures)
            return
        await asyncio.gather(
            *(
                self._chunk(calls[i : i + limit], futures[i : i + limit])
                for i in range(0, len(calls), limit)
            )
        )

    async def _chunk(self, calls: Sequence[Call], futures: list[asyncio.Future[Result]]) -> None:
        try:
            results = await self._send(calls)
            if len(results) != len(calls):
                raise RuntimeError(f"a batched store call answered {len(results)} of {len(calls)}")
        except BaseException as exc:
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):  # cancellation, interpreter exit: pass it on
                raise
            return
        for future, result in zip(futures, results, strict=True):
            if future.done():  # the caller went away: its call was sent all the same
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def close(self) -> None:
        """Wait for the waves in flight."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
