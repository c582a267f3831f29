"""What a session store keeps, and the protocol every store implements.

A :class:`SessionRecord` is the whole durable state of one session: which
model version it runs on, its recurrent state as one flat float32 vector, its
step counter and timestamps, and room for the last step's encoded result (so
a retried step can be answered without being applied twice).

Stores never modify a record in place: every update writes a new record,
conditioned on the ``revision`` the writer read (:meth:`SessionStore.compare_and_set`).
``revision`` grows by one on every write (steps and resets), so a stale writer
always loses, even after a reset brought ``step`` back to an earlier value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """One session.

    Attributes:
        session_id: the store key: the client's id in its tenant's namespace (the id
            itself for tenant ""; :mod:`gruserve.sessions.owner`).
        model, version: the model version whose state layout ``state`` follows.
        state: (total_units,) float32, the states in manifest order.
        step: steps applied since creation or the last reset.
        timesteps: timesteps applied since creation or the last reset.
        revision: write counter for compare-and-set; 0 when created.
        created_at, last_used_at: Unix seconds; idle expiry counts from ``last_used_at``.
        last_result: the last step's encoded reply, or None (kept for exactly-once retries).
        owner: the name of the API key (tenant) that created it; "" without names.
        history: the session's last inputs (:mod:`gruserve.sessions.history`), or None
            (``GRUSERVE_SESSION_HISTORY`` = 0, or nothing kept since the last reset).
    """

    session_id: str
    model: str
    version: int
    state: np.ndarray
    step: int = 0
    timesteps: int = 0
    revision: int = 0
    created_at: float = 0.0
    last_used_at: float = 0.0
    last_result: bytes | None = None
    owner: str = ""
    history: bytes | None = None

    def advanced(
        self,
        state: np.ndarray,
        timesteps: int,
        now: float,
        result: bytes | None = None,
        history: bytes | None = None,
    ) -> SessionRecord:
        """The record after one more step; ``history`` replaces the kept inputs (None:
        history is off, nothing is kept).

        Built field by field through the slots' own setters rather than the frozen
        dataclass's ``__init__`` (one ``object.__setattr__`` call per field): this is on
        every step's path, a bulk's many times per request, and it takes half the time."""
        new = _NEW(SessionRecord)
        _SET_ID(new, self.session_id)
        _SET_MODEL(new, self.model)
        _SET_VERSION(new, self.version)
        _SET_STATE(new, state)
        _SET_STEP(new, self.step + 1)
        _SET_TIMESTEPS(new, self.timesteps + timesteps)
        _SET_REVISION(new, self.revision + 1)
        _SET_CREATED(new, self.created_at)
        _SET_USED(new, now)
        _SET_RESULT(new, result)
        _SET_OWNER(new, self.owner)
        _SET_HISTORY(new, history)
        return new

    def reset(self, state: np.ndarray, now: float) -> SessionRecord:
        """The record after ``reset``: new state, counters back to zero, no kept inputs."""
        return dataclasses.replace(
            self,
            state=state,
            step=0,
            timesteps=0,
            revision=self.revision + 1,
            last_used_at=now,
            last_result=None,
            history=None,
        )


_NEW = object.__new__
# each slot's setter (a member descriptor's ``__set__``: the frozen check is in
# ``__setattr__``, which this bypasses); :meth:`SessionRecord.advanced` sets every field
(
    _SET_ID,
    _SET_MODEL,
    _SET_VERSION,
    _SET_STATE,
    _SET_STEP,
    _SET_TIMESTEPS,
    _SET_REVISION,
    _SET_CREATED,
    _SET_USED,
    _SET_RESULT,
    _SET_OWNER,
    _SET_HISTORY,
) = (getattr(SessionRecord, f.name).__set__ for f in dataclasses.fields(SessionRecord))


@dataclass(frozen=True, slots=True)
class SessionSummary:
    """What a listing shows of one session: never its state or stored result (``owner``:
    "" where a store's listing does not read it; the session service fills it in)."""

    session_id: str
    model: str
    version: int
    step: int
    timesteps: int
    created_at: float
    last_used_at: float
    owner: str = ""

    @classmethod
    def of(cls, record: SessionRecord) -> SessionSummary:
        return cls(
            record.session_id,
            record.model,
            record.version,
            record.step,
            record.timesteps,
            record.created_at,
            record.last_used_at,
            record.owner,
        )


@dataclass(frozen=True, slots=True)
class SessionPage:
    """One page of a listing in session id order; ``next_cursor`` None on the last page.

    A page may hold fewer than the sessions asked for (even none) while ``next_cursor``
    is set: a store bounds the ids it examines per page (a ``model`` filter skips some).
    """

    sessions: list[SessionSummary]
    next_cursor: str | None


CREATE = -1
"""The ``expected_revision`` of a compare-and-set that creates the session if it is absent."""
MAX_PAGE = 1000
"""Most sessions one listing page returns."""
SCAN_PER_PAGE = 10_000
"""Most session ids a store examines for one page."""


class Kept(NamedTuple):
    """A record this server wrote last, as :meth:`SessionStore.recent` hands it back.

    Attributes:
        record: the record as written.
        writer: the token its write stored beside it; a compare-and-set based on ``record``
            passes it as ``base``, so it wins only if the stored record is still this very
            write (the revision alone could be a re-created session's).
    """

    record: SessionRecord
    writer: str


Write = tuple[SessionRecord, int] | tuple[SessionRecord, int, str]
"""One write of :meth:`SessionStore.compare_and_set_many`: the record, the revision it
expects, and optionally the ``base`` writer token of a kept record it was based on."""


class SessionStore(Protocol):
    """Async storage of :class:`SessionRecord` with expiry, a size limit and compare-and-set.

    Sessions expire ``ttl_s`` after their last write (idle) and, when a lifetime is set,
    that long after ``created_at``; a full store rejects new sessions or evicts the least
    recently used one. Stores report expirations and evictions to a
    :class:`~gruserve.sessions.events.SessionEvents`. Every method may raise
    ``StoreUnavailable`` when the backing service is down.
    """

    name: str

    async def create(self, record: SessionRecord) -> None:
        """Insert a new record (evicting the least recently used one if full and so configured).

        Raises:
            SessionExists: the id is taken.
            TooManySessions: the store is full and does not evict.
        """

    async def get(self, session_id: str) -> SessionRecord:
        """The current record (reading does not refresh the idle timer).

        Raises:
            SessionNotFound: unknown, deleted or expired.
        """

    async def compare_and_set(
        self, record: SessionRecord, expected_revision: int, end: bool = False, base: str = ""
    ) -> bool:
        """Replace the record if its stored revision still is ``expected_revision`` (and,
        with ``base``, its write still is the one :meth:`recent` named so).

        Returns False when another writer got there first (re-read and retry).
        Refreshes the idle timer. With ``expected_revision`` :data:`CREATE` the record is
        inserted if the id is absent (counted against the limit as :meth:`create` counts
        it) and False is returned if it exists. With ``end`` the session is removed
        instead of stored (a create that ends at once stores nothing and takes no room).

        Raises:
            SessionNotFound: the session vanished (deleted or expired).
            TooManySessions: a create found the store full and it does not evict.
        """

    def recent(self, session_id: str) -> Kept | None:
        """Take the record this server's last successful write of ``session_id`` stored, if it
        still keeps it (bounded; a store with nothing to save by it keeps none): a step may
        start from it instead of reading, and must then write with ``base``. Taken, it is no
        longer kept, until the next successful write."""

    async def get_many(self, session_ids: Sequence[str]) -> list[SessionRecord | Exception]:
        """:meth:`get` of each id at once (one round trip for a remote store): per id its
        record, or the ``SessionNotFound`` it raised; a store failure raises for all."""

    async def compare_and_set_many(self, writes: Sequence[Write]) -> list[bool | Exception]:
        """:meth:`compare_and_set` of each ``(record, expected_revision)`` or ``(record,
        expected_revision, base)`` (a write based on a :meth:`recent` record), each decided
        on its own (one lost race fails that write only): per write True, False or
        ``SessionNotFound``; a store failure raises for all."""

    async def delete(self, session_id: str) -> None:
        """Remove a session.

        Raises:
            SessionNotFound: unknown, deleted or expired.
        """

    async def count(self) -> int:
        """Sessions currently held (expired ones excluded)."""

    async def page(self, cursor: str | None, limit: int, model: str | None) -> SessionPage:
        """Up to ``limit`` sessions whose id sorts after ``cursor`` (from the first if None),
        of ``model`` only when given. Stable: sessions created or removed meanwhile never
        shift the ids a cursor continues from."""

    async def sweep(self) -> int:
        """Forget expired sessions (called in the background, off the request path);
        returns the sessions held. Creates never depend on it: a full store sweeps before
        refusing, so the limit counts live sessions only."""

    async def ping(self) -> None:
        """Return when the store is reachable and would serve; raise ``StoreUnavailable``
        (or its kind ``StoreDenied``) otherwise."""

    async def cautions(self) -> list[str]:
        """What in the store's own configuration can lose sessions or refuse requests, one
        sentence each for the start-up log (empty: nothing; a store that cannot tell says
        nothing)."""

    async def close(self) -> None:
        """Release connections and background tasks."""
