"""How many sessions each model version holds, for the ``/metrics`` gauge.

The memory store is counted on every scrape: its records are in this process, so a
count costs a pass over a dict and is always exact. A shared store (Redis) holds its
sessions elsewhere and keeps no per-version counters: counters kept by the store's
scripts could not be decremented for sessions that *expire* (Redis drops the hash on
its own, version and all), so they would drift. Instead a background task walks the
store's listing (:meth:`SessionStore.page`, the same bounded pages ``GET /v1/sessions``
uses) every ``interval_s`` seconds, and scrapes read the last count. A scrape therefore
never walks the store; the gauge is at most one interval (plus one walk) old. Each
replica walks on its own: the counts are the whole fleet's, so a dashboard takes the
``max`` across replicas, not the sum.
"""

from __future__ import annotations

from collections import Counter

from gruserve.periodic import Periodic
from gruserve.sessions.memory import MemorySessionStore
from gruserve.sessions.store import MAX_PAGE, SessionStore

Counts = dict[tuple[str, int], int]
"""Sessions per (model name, version)."""


async def count_by_version(store: SessionStore, page_size: int = MAX_PAGE) -> Counts:
    """Walk every page of ``store``'s listing (``page_size`` sessions a page) and count its
    sessions per version.

    Raises:
        StoreUnavailable: the store did not answer.
    """
    counts: Counter[tuple[str, int]] = Counter()
    cursor: str | None = None
    while True:
        page = await store.page(cursor, page_size, None)
        counts.update((s.model, s.version) for s in page.sessions)
        if page.next_cursor is None:
            return dict(counts)
        cursor = page.next_cursor


class VersionCensus(Periodic):
    """Sessions per model version: counted now (memory store) or every ``interval_s`` in
    the background (any other store) between :meth:`start` and :meth:`stop`.

    Args:
        store: the session store.
        interval_s: seconds between background counts (> 0).

    Raises:
        ValueError: ``interval_s`` <= 0.
    """

    name, what = "gruserve-version-census", "counting sessions per model version"
    first_now = True

    def __init__(self, store: SessionStore, interval_s: float) -> None:
        super().__init__(interval_s)
        self.store = store
        self._last: Counts | None = None

    @property
    def in_process(self) -> bool:
        """True when the store's records are in this process (counted on every call)."""
        return isinstance(self.store, MemorySessionStore)

    def counts(self) -> Counts | None:
        """The latest counts; None while a shared store has not been counted yet."""
        if isinstance(self.store, MemorySessionStore):
            return dict(Counter((r.model, r.version) for r in self.store.records()))
        return None if self._last is None else dict(self._last)

    def start(self) -> None:
        """Start counting in the background (a shared store only); a second call does nothing."""
        if not self.in_process:
            super().start()

    async def tick(self) -> None:
        self._last = await count_by_version(self.store)
