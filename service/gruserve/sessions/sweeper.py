"""Forgetting expired sessions in the background, off every request's path.

A store's index of sessions (the ordered dict of the memory store, the sorted sets
of the Redis store) keeps an expired session's id until something removes it. If
creates did that, a create after a quiet spell would pay for every session that
expired meanwhile; instead one task per server calls :meth:`SessionStore.sweep` on
an interval. The ``max_sessions`` limit does not depend on it: a store that looks
full sweeps before refusing or evicting, so the limit always counts live sessions.
"""

from __future__ import annotations

from gruserve.periodic import Periodic
from gruserve.sessions.store import SessionStore


class Sweeper(Periodic):
    """Calls ``store.sweep()`` every ``interval_s`` seconds between :meth:`start` and
    :meth:`stop`.

    Args:
        store: the session store to sweep.
        interval_s: seconds between sweeps (> 0).

    Raises:
        ValueError: ``interval_s`` <= 0.
    """

    name, what = "gruserve-sweeper", "sweeping expired sessions"

    def __init__(self, store: SessionStore, interval_s: float) -> None:
        super().__init__(interval_s)
        self.store = store
        self.sweeps = 0
        """Sweeps done (tests check the task runs)."""

    async def tick(self) -> None:
        await self.store.sweep()
        self.sweeps += 1
