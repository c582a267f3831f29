"""In-process session store: a dict in least-recently-written order.

Every operation on one session is O(1) amortised: the ordered dict keeps sessions
sorted by their last write, so idle-expired sessions are always at its front (a
sweep stops at the first live one) and the front is the least recently used
session, the one an ``lru`` store evicts. With a maximum lifetime a second ordered
dict keeps creation order, so lifetime expiry sweeps the same way. Records are
immutable, so handing out the stored object is safe. One process only: use the
Redis store for several replicas (or a snapshot to survive a restart, see
:mod:`gruserve.sessions.snapshot`).
"""

from __future__ import annotations

import bisect
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

from gruserve.errors import SessionExists, SessionNotFound, TooManySessions
from gruserve.sessions.events import IDLE, LIFETIME, SessionEvents
from gruserve.sessions.store import (
    CREATE,
    SCAN_PER_PAGE,
    Kept,
    SessionPage,
    SessionRecord,
    SessionSummary,
    Write,
)


class MemorySessionStore:
    """Sessions in a dict, expiring ``ttl_s`` after their last write.

    Args:
        ttl_s: idle time to live in seconds (> 0).
        max_sessions: most sessions held at once (>= 1).
        clock: Unix-seconds clock (injectable for tests).
        max_lifetime_s: seconds from ``created_at`` after which a session expires however
            busy (0: no limit).
        eviction: ``"reject"`` a create when full (TooManySessions), or ``"lru"``: evict
            the least recently used session.
        events: told about expired and evicted sessions (metrics, logs), or None.
    """

    name = "memory"

    def __init__(
        self,
        ttl_s: float,
        max_sessions: int,
        clock: Callable[[], float] = time.time,
        *,
        max_lifetime_s: float = 0.0,
        eviction: Literal["reject", "lru"] = "reject",
        events: SessionEvents | None = None,
    ) -> None:
        if not ttl_s > 0:
            raise ValueError(f"MemorySessionStore needs ttl_s > 0. Received: ttl_s={ttl_s!r}")
        if max_sessions < 1:
            raise ValueError(
                f"MemorySessionStore needs max_sessions >= 1. Received: {max_sessions!r}"
            )
        if not max_lifetime_s >= 0:
            raise ValueError(
                f"MemorySessionStore needs max_lifetime_s >= 0. Received: {max_lifetime_s!r}"
            )
        if eviction not in ("reject", "lru"):
            raise ValueError(
                f"MemorySessionStore eviction is 'reject' or 'lru'. Received: {eviction!r}"
            )
        self.ttl_s, self.max_sessions, self._clock = ttl_s, max_sessions, clock
        self.max_lifetime_s, self.eviction = max_lifetime_s, eviction
        self._events = events if events is not None else SessionEvents()
        self._records: OrderedDict[str, SessionRecord] = OrderedDict()
        self._born: OrderedDict[str, float] = OrderedDict()  # creation order, with a lifetime
        self._sorted: list[str] | None = None  # ids in order, for listing; None: stale

    # -- membership ----------------------------------------------------------------------
    def _insert(self, record: SessionRecord) -> None:
        self._records[record.session_id] = record
        if self.max_lifetime_s:
            self._born[record.session_id] = record.created_at
        self._sorted = None

    def _remove(self, session_id: str) -> None:
        del self._records[session_id]
        self._born.pop(session_id, None)
        self._sorted = None

    def _sweep(self) -> None:
        now = self._clock()
        if self.max_lifetime_s:
            horizon, born, gone = now - self.max_lifetime_s, self._born, []
            while born:
                session_id, created_at = next(iter(born.items()))
                if created_at > horizon:
                    break
                self._remove(session_id)
                gone.append(session_id)
            self._events.expired(LIFETIME, gone)
        horizon, records, idle = now - self.ttl_s, self._records, []
        while records:
            oldest = next(iter(records.values()))
            if oldest.last_used_at > horizon:
                break
            self._remove(oldest.session_id)
            idle.append(oldest.session_id)
        self._events.expired(IDLE, idle)

    def _live(self, session_id: str) -> SessionRecord:
        record = self._records.get(session_id)
        if record is None:
            raise SessionNotFound(session_id)
        now = self._clock()
        if self.max_lifetime_s and record.created_at <= now - self.max_lifetime_s:
            self._remove(session_id)
            self._events.expired(LIFETIME, [session_id])
            raise SessionNotFound(session_id)
        if record.last_used_at <= now - self.ttl_s:
            self._remove(session_id)
            self._events.expired(IDLE, [session_id])
            raise SessionNotFound(session_id)
        return record

    def _held(self, session_id: str) -> bool:
        """Whether a live session has this id (an expired one is removed on the way)."""
        if session_id not in self._records:
            return False
        try:
            self._live(session_id)
        except SessionNotFound:
            return False
        return True

    def _admit(self, record: SessionRecord) -> None:
        """Insert a new session, making room first: expired sessions are swept only when
        the store looks full (the background sweep keeps it small otherwise), so the limit
        counts live sessions and a create does no work per expired one."""
        if len(self._records) >= self.max_sessions:
            self._sweep()
        if len(self._records) >= self.max_sessions:
            if self.eviction != "lru":
                raise TooManySessions(self.max_sessions)
            evicted = []
            while len(self._records) >= self.max_sessions:
                victim = next(iter(self._records))
                self._remove(victim)
                evicted.append(victim)
            self._events.evicted(evicted)
        self._insert(record)

    # -- the protocol ----------------------------------------------------------------------
    async def create(self, record: SessionRecord) -> None:
        if self._held(record.session_id):
            raise SessionExists(record.session_id)
        self._admit(record)

    async def get(self, session_id: str) -> SessionRecord:
        return self._live(session_id)

    async def compare_and_set(
        self, record: SessionRecord, expected_revision: int, end: bool = False, base: str = ""
    ) -> bool:
        return self._swap(record, expected_revision, end)  # recent() keeps none: no base

    def recent(self, session_id: str) -> Kept | None:
        """None: a read here is a dict lookup, so keeping records would save nothing."""
        return None

    def _swap(self, record: SessionRecord, expected_revision: int, end: bool = False) -> bool:
        if expected_revision == CREATE:
            if self._held(record.session_id):
                return False
            if not end:
                self._admit(record)
            return True
        current = self._live(record.session_id)
        if current.revision != expected_revision:
            return False
        if end:
            self._remove(record.session_id)
            return True
        self._records[record.session_id] = record
        self._records.move_to_end(record.session_id)
        if self.max_lifetime_s and record.created_at != current.created_at:  # a v2 restart
            self._born[record.session_id] = record.created_at
            self._born.move_to_end(record.session_id)
        return True

    async def get_many(self, session_ids: Sequence[str]) -> list[SessionRecord | Exception]:
        out: list[SessionRecord | Exception] = []
        for session_id in session_ids:
            try:
                out.append(self._live(session_id))
            except SessionNotFound as exc:
                out.append(exc)
        return out

    async def compare_and_set_many(self, writes: Sequence[Write]) -> list[bool | Exception]:
        out: list[bool | Exception] = []
        for record, expected_revision, *_ in writes:  # recent() keeps none: no base
            try:
                out.append(self._swap(record, expected_revision))
            except SessionNotFound as exc:
                out.append(exc)
        return out

    async def delete(self, session_id: str) -> None:
        self._live(session_id)
        self._remove(session_id)

    async def count(self) -> int:
        self._sweep()
        return len(self._records)

    async def page(self, cursor: str | None, limit: int, model: str | None) -> SessionPage:
        self._sweep()
        if self._sorted is None:
            self._sorted = sorted(self._records)
        ids = self._sorted
        start = 0 if cursor is None else bisect.bisect_right(ids, cursor)
        end = min(len(ids), start + SCAN_PER_PAGE)
        found: list[SessionSummary] = []
        i = start
        while i < end and len(found) < limit:
            record = self._records[ids[i]]
            if model is None or record.model == model:
                found.append(SessionSummary.of(record))
            i += 1
        return SessionPage(found, ids[i - 1] if i < len(ids) and i > start else None)

    async def sweep(self) -> int:
        self._sweep()
        return len(self._records)

    async def ping(self) -> None:
        return None

    async def cautions(self) -> list[str]:
        return []

    async def close(self) -> None:
        self._records.clear()
        self._born.clear()
        self._sorted = None

    # -- snapshots -------------------------------------------------------------------------
    def records(self) -> list[SessionRecord]:
        """Every live session, least recently used first (what a snapshot writes)."""
        self._sweep()
        return list(self._records.values())

    def restore(self, records: Iterable[SessionRecord]) -> list[SessionRecord]:
        """Add ``records`` (from a snapshot) that have not expired, keeping at most
        ``max_sessions`` (the most recently used); returns those added. Ids already held
        keep the held session."""
        now = self._clock()
        live = [
            r
            for r in records
            if r.last_used_at > now - self.ttl_s
            and not (self.max_lifetime_s and r.created_at <= now - self.max_lifetime_s)
            and r.session_id not in self._records
        ]
        live.sort(key=lambda r: r.last_used_at)
        room = max(0, self.max_sessions - len(self._records))
        added = live[len(live) - room :] if room else []
        for record in added:
            self._insert(record)
        # both orders the sweeps rely on: last write, and creation (with a lifetime)
        self._records = OrderedDict(
            sorted(self._records.items(), key=lambda item: item[1].last_used_at)
        )
        self._born = OrderedDict(sorted(self._born.items(), key=lambda item: item[1]))
        return added
