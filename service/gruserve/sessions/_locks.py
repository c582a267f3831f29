"""First-come, first-served locks keyed by session id, dropped as soon as nobody holds them.

Per-session ordering is on every step's path, so this is a small hand-made
FIFO lock rather than one ``asyncio.Lock`` per session: taking a free key is
two dict operations and no await; waiters queue as futures and the holder
hands the key to the oldest one on release, so nobody can overtake. A key
exists only while someone holds or waits for it: idle sessions cost nothing.

Cancellation is safe: a waiter cancelled before its turn leaves the queue; one
cancelled just after being handed the key passes it on.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from types import TracebackType
from typing import TypeVar

T = TypeVar("T")


class _Hold:
    __slots__ = ("_key", "_locks")

    def __init__(self, locks: KeyedLocks, key: str) -> None:
        self._locks, self._key = locks, key

    async def __aenter__(self) -> None:
        await self._locks.acquire(self._key)

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._locks.release(self._key)


class KeyedLocks:
    """``async with locks.hold(key):`` runs the body alone among holders of ``key``, FIFO."""

    def __init__(self) -> None:
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}

    def hold(self, key: str) -> _Hold:
        return _Hold(self, key)

    def try_acquire(self, key: str) -> bool:
        """Take ``key`` if nobody holds it (no await: the hot path's uncontended case);
        False means :meth:`acquire` must be awaited."""
        if key in self._waiters:
            return False
        self._waiters[key] = deque()  # held, nobody waiting
        return True

    def take_free(self, keyed: Iterable[tuple[str, T]]) -> tuple[list[str], list[T], list[T]]:
        """Of ``(key, item)`` pairs, take every free key without waiting (a bulk's first
        pass): the keys taken, their items, and the items whose key was busy, in order."""
        keys: list[str] = []
        taken: list[T] = []
        busy: list[T] = []
        for key, item in keyed:
            if self.try_acquire(key):
                keys.append(key)
                taken.append(item)
            else:
                busy.append(item)
        return keys, taken, busy

    async def acquire(self, key: str) -> None:
        if self.try_acquire(key):
            return
        queue = self._waiters[key]
        waiter = asyncio.get_running_loop().create_future()
        queue.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(key)  # we were handed the key as we were cancelled: pass it on
            elif waiter in queue:
                queue.remove(waiter)
            raise

    def release(self, key: str) -> None:
        queue = self._waiters[key]
        while queue:
            waiter = queue.popleft()
            if not waiter.done():
                waiter.set_result(None)  # hand over: the key stays held
                return
        del self._waiters[key]

    def __len__(self) -> int:
        return len(self._waiters)
