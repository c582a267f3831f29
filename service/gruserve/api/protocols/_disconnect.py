"""Cancel a request's work when its HTTP client disconnects (STYLE §2).

ASGI servers do not cancel a handler whose client went away; they only report
``http.disconnect`` on ``receive``. :func:`unless_disconnected` watches for that
message beside the work and cancels the work when it arrives, so a step
waiting in a session queue or a batch is dropped instead of computed for nobody.

That watcher is a task per request: on the hot step route its creation and
cancellation were ~6% of a request's cost (bench/README.md). :class:`DisconnectWatch`
gives the same cancellation for the price of two dict operations per request: one
timer, every ``grace_s``, starts the watcher of each request still unanswered after
``grace_s``, so only the slow requests, the ones worth cancelling, ever get one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.types import Receive

from gruserve.api.errors import ClientDisconnected

T = TypeVar("T")
Watch = Callable[[Awaitable[Any]], Awaitable[Any]]
"""Awaits a request's work, raising ClientDisconnected if its client leaves first
(:meth:`DisconnectWatch.run` with its ``receive`` bound, or the HTTP protocol's own)."""
GRACE_S = 0.01


async def _disconnected(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` (body already read); raise ClientDisconnected if the client leaves first."""
    current = asyncio.current_task()
    if current is None:  # pragma: no cover - always inside a task under an ASGI server
        return await work
    watcher = asyncio.get_running_loop().create_task(_disconnected(request.receive))
    gone = False

    def cancel(task: asyncio.Task[None]) -> None:
        nonlocal gone
        if not task.cancelled() and task.exception() is None:
            gone = True
            current.cancel()

    watcher.add_done_callback(cancel)
    try:
        return await work
    except asyncio.CancelledError:
        if gone and current.uncancel() == 0:
            raise ClientDisconnected from None
        raise
    finally:
        watcher.remove_done_callback(cancel)
        watcher.cancel()


class DisconnectWatch:
    """:func:`unless_disconnected` for many requests, watching only the slow ones.

    A sweep every ``grace_s`` starts the watcher of each request that is at least
    ``grace_s`` old, so a request is watched from between ``grace_s`` and ``2 * grace_s``
    on: from then, its work is cancelled as soon as the server reports the disconnect,
    as with :func:`unless_disconnected`. A client that leaves earlier has its work
    finished; work that ends earlier never had a watcher.

    Args:
        grace_s: how long a request runs unwatched (> 0); also the sweep period.
    """

    def __init__(self, grace_s: float = GRACE_S) -> None:
        if not grace_s > 0:
            raise ValueError(f"DisconnectWatch needs grace_s > 0. Received: grace_s={grace_s!r}")
        self.grace_s = grace_s
        self._waiting: dict[asyncio.Task[object], tuple[Receive, float]] = {}
        self._watchers: dict[asyncio.Task[object], asyncio.Task[None]] = {}
        self._gone: set[asyncio.Task[object]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def watching(self) -> int:
        """Requests that have a watcher task now."""
        return len(self._watchers)

    async def run(self, receive: Receive, work: Awaitable[T]) -> T:
        """Await ``work`` (body already read); raise ClientDisconnected if the client leaves."""
        current = asyncio.current_task()
        if current is None:  # pragma: no cover - always inside a task under an ASGI server
            return await work
        loop = asyncio.get_running_loop()
        self._waiting[current] = (receive, loop.time())
        if self._timer is None or self._loop is not loop:
            self._loop, self._timer = loop, loop.call_later(self.grace_s, self._sweep, loop)
        try:
            return await work
        except asyncio.CancelledError:
            if current in self._gone and current.uncancel() == 0:
                raise ClientDisconnected from None
            raise
        finally:
            del self._waiting[current]
            self._gone.discard(current)
            watcher = self._watchers.pop(current, None)
            if watcher is not None:
                watcher.cancel()

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        old = loop.time() - self.grace_s
        for task, (receive, since) in self._waiting.items():
            if since <= old and task not in self._watchers:
                watcher = loop.create_task(_disconnected(receive))
                watcher.add_done_callback(partial(self._left, task=task))
                self._watchers[task] = watcher
        if self._waiting:
            self._timer = loop.call_later(self.grace_s, self._sweep, loop)

    def _left(self, watcher: asyncio.Task[None], task: asyncio.Task[object]) -> None:
        if watcher.cancelled() or watcher.exception() is not None:
            return
        if self._watchers.get(task) is watcher:
            self._gone.add(task)
            task.cancel()
