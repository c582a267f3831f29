"""Work a serving process repeats in the background, on an interval, in its event loop.

Sweeping expired sessions (:mod:`gruserve.sessions.sweeper`) and counting sessions per
model version (:mod:`gruserve.sessions.census`) share one shape: a task started with the
app, one pass every ``interval_s``, a store that is down costing a warning and not the
task (the next pass tries again; requests report the outage themselves), and a stop that
waits for a pass in progress so that the store is not closed under it.
"""

from __future__ import annotations

import asyncio
import logging

from gruserve.errors import GruServeError

log = logging.getLogger("gruserve")


class Periodic:
    """Calls :meth:`tick` every ``interval_s`` seconds between :meth:`start` and :meth:`stop`.

    Subclasses set ``name`` (the task's), ``what`` (what a tick does, for the warning when
    it fails) and, with ``first_now``, tick once at start instead of after the first
    interval.

    Raises:
        ValueError: ``interval_s`` <= 0.
    """

    name = "gruserve-periodic"
    what = "background work"
    first_now = False

    def __init__(self, interval_s: float) -> None:
        if not interval_s > 0:
            raise ValueError(
                f"{type(self).__name__} needs interval_s > 0. Received: {interval_s!r}"
            )
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def tick(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        """Start ticking (in the running event loop); a second call does nothing."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def _run(self) -> None:
        if not self.first_now:
            await asyncio.sleep(self.interval_s)
        while True:
            try:
                await self.tick()
            except GruServeError as exc:  # the store is down: try again next time
                log.warning("%s failed: %s", self.what, exc)
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        """Stop ticking and wait for a tick in progress to end."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            if not task.cancelled():  # our own caller was cancelled, not the task
                raise
