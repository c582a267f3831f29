"""In-process session store: a dict in least-recently-written order.

Every operation is O(1) amortised: the ordered dict keeps sessions sorted by
their last write, so expired sessions are always at its front and a sweep
stops at the first live one. Records are immutable, so handing out the stored
object is safe. One process only: use the Redis store for several replicas.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from gruserve.errors import SessionExists, SessionNotFound, TooManySessions
from gruserve.sessions.store import SessionRecord


class MemorySessionStore:
    """Sessions in a dict, expiring ``ttl_s`` after their last write.

    Args:
        ttl_s: idle time to live in seconds (> 0).
        max_sessions: most sessions held at once (>= 1).
        clock: Unix-seconds clock (injectable for tests).
    """

    name = "memory"

    def __init__(
        self, ttl_s: float, max_sessions: int, clock: Callable[[], float] = time.time
    ) -> None:
        if not ttl_s > 0:
            raise ValueError(f"MemorySessionStore needs ttl_s > 0. Received: ttl_s={ttl_s!r}")
        if max_sessions < 1:
            raise ValueError(
                f"MemorySessionStore needs max_sessions >= 1. Received: {max_sessions!r}"
            )
        self.ttl_s, self.max_sessions, self._clock = ttl_s, max_sessions, clock
        self._records: OrderedDict[str, SessionRecord] = OrderedDict()

    def _sweep(self) -> None:
        horizon = self._clock() - self.ttl_s
        records = self._records
        while records:
            oldest = next(iter(records.values()))
            if oldest.last_used_at > horizon:
                break
            records.popitem(last=False)

    def _live(self, session_id: str) -> SessionRecord:
        record = self._records.get(session_id)
        if record is None:
            raise SessionNotFound(session_id)
        if record.last_used_at <= self._clock() - self.ttl_s:
            del self._records[session_id]
            raise SessionNotFound(session_id)
        return record

    async def create(self, record: SessionRecord) -> None:
        self._sweep()
        if record.session_id in self._records:
            raise SessionExists(record.session_id)
        if len(self._records) >= self.max_sessions:
            raise TooManySessions(self.max_sessions)
        self._records[record.session_id] = record

    async def get(self, session_id: str) -> SessionRecord:
        return self._live(session_id)

    async def compare_and_set(self, record: SessionRecord, expected_revision: int) -> bool:
        current = self._live(record.session_id)
        if current.revision != expected_revision:
            return False
        self._records[record.session_id] = record
        self._records.move_to_end(record.session_id)
        return True

    async def delete(self, session_id: str) -> None:
        self._live(session_id)
        del self._records[session_id]

    async def count(self) -> int:
        self._sweep()
        return len(self._records)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._records.clear()
