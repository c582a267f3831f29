"""The records a Redis store wrote last, kept so that a session's next step need not read.

A step on a Redis-backed session costs two round trips: a read of its record, then the
compare-and-set of the next one. When the same server wrote that record (one replica,
sticky load balancing, a WebSocket's whole life), it already holds it: the step can go
straight to the compare-and-set, which still refuses a stale base. Revision alone cannot
tell a kept record from a session that was deleted, created again and stepped to the same
revision elsewhere, so the kept record carries the ``writer`` token its write stored, and
a write based on it must find that token too (:class:`~gruserve.sessions.store.Kept`).

Bounded by count (``GRUSERVE_STORE_RECENT_RECORDS``): the least recently written go
first. Taking a record removes it, so a record is used at most once: a step that does not
end in its own successful write falls back to reading, and only the next successful
write keeps a record again.

A kept record found stale costs more than a read: the compare-and-set finds out only after
the step has run, and the step runs again on a fresh read. So a session whose write based
on a kept record lost (another replica wrote it since: round-robin routing, no affinity)
is kept no more until this server's writes of it follow each other again (a write whose
base revision is the one this server's previous write stored); until then its steps read,
as they would with no kept records. One int per such session, bounded like the records.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import numpy as np

from gruserve.sessions.store import Kept, SessionRecord

_FLOAT32 = np.dtype("<f4")


class RecentRecords:
    """Up to ``limit`` kept records by store key, least recently written evicted first.

    Args:
        limit: most records kept (0: none; every call is then a no-op).
        history: whether the store keeps each record's ``history`` (off, a kept record
            drops it, as a read would return it).

    Raises:
        ValueError: ``limit`` < 0.
    """

    def __init__(self, limit: int, history: bool = False) -> None:
        if limit < 0:
            raise ValueError(f"RecentRecords needs limit >= 0. Received: limit={limit!r}")
        self.limit, self._history = limit, history
        self._kept: OrderedDict[str, Kept] = OrderedDict()
        # sessions whose kept record went stale: the revision this server wrote last (-1: none)
        self._strays: OrderedDict[str, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._kept)

    def keep(self, record: SessionRecord, writer: str, expected: int) -> None:
        """Remember ``record``, which a write with token ``writer`` just stored over revision
        ``expected`` (not if the session went stale here and another replica wrote it since
        this server's last write).

        Kept as a read would return it: float32 state of its own (a bulk step's state is a
        row of its run's output, which would keep the whole run alive, and a step must
        compute on exactly what a read gives), no ``history`` when the store keeps none."""
        if not self.limit:
            return
        strays = self._strays
        if strays:
            ours = strays.pop(record.session_id, None)
            if ours is not None and ours != expected:
                self._mark(record.session_id, record.revision)
                return
        state, history = record.state, record.history if self._history else None
        if state.dtype != _FLOAT32 or state.base is not None or history is not record.history:
            state = np.array(state, dtype=_FLOAT32)
            record = dataclasses.replace(record, state=state, history=history)
        kept_map = self._kept
        kept_map[record.session_id] = Kept(record, writer)
        kept_map.move_to_end(record.session_id)
        if len(kept_map) > self.limit:
            kept_map.popitem(last=False)

    def stray(self, session_id: str) -> None:
        """Note that a write based on ``session_id``'s kept record lost: another replica
        wrote the session since."""
        if self.limit:
            self._mark(session_id, -1)

    def _mark(self, session_id: str, revision: int) -> None:
        strays = self._strays
        strays[session_id] = revision
        strays.move_to_end(session_id)
        if len(strays) > self.limit:
            strays.popitem(last=False)

    def take(self, session_id: str) -> Kept | None:
        """The record kept for ``session_id``, no longer kept (None: none)."""
        return self._kept.pop(session_id, None) if self._kept else None

    def drop(self, session_id: str) -> None:
        """Forget ``session_id``'s record (a write of it failed, or the session is gone)."""
        if self._kept:
            self._kept.pop(session_id, None)
