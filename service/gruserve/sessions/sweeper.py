"""Forgetting expired sessions in the background, off every request's path.

A store's index of sessions (the ordered dict of the memory store, the sorted sets
of the Redis store) keeps an expired session's id until something removes it. If
creates did that, a create after a quiet spell would pay for every session that
expired meanwhile; instead one task per server calls :meth:`SessionStore.sweep` on
an interval. The ``max_sessions`` limit does not depend on it: a store that looks
full sweeps before refusing or evicting, so the limit always counts live sessions.
"""

from __future__ import annotations

import asyncio
import logging

from gruserve.errors import GruServeError
from gruserve.sessions.store import SessionStore

log = logging.getLogger("gruserve")


class Sweeper:
    """Calls ``store.sweep()`` every ``interval_s`` seconds between :meth:`start` and
    :meth:`stop`.

    Args:
        store: the session store to sweep.
        interval_s: seconds between sweeps (> 0).

    Raises:
        ValueError: ``interval_s`` <= 0.
    """

    def __init__(self, store: SessionStore, interval_s: float) -> None:
        if not interval_s > 0:
            raise ValueError(f"Sweeper needs interval_s > 0. Received: {interval_s!r}")
        self.store, self.interval_s = store, interval_s
        self._task: asyncio.Task[None] | None = None
        self.sweeps = 0
        """Sweeps done (tests check the task runs)."""

    def start(self) -> None:
        """Start sweeping (in the running event loop); a second call does nothing."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="gruserve-sweeper"
            )

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.store.sweep()
            except GruServeError as exc:  # the store is down: requests say so; try again later
                log.warning("sweeping expired sessions failed: %s", exc)
            self.sweeps += 1

    async def stop(self) -> None:
        """Stop sweeping and wait for a sweep in progress to end."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            if not task.cancelled():  # our own caller was cancelled, not the task
                raise
