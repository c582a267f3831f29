"""What the session service shares with the modules that step sessions beside it.

:class:`~gruserve.sessions.service.SessionService` is the only door the front-ends use,
but some of its work lives in sibling modules of their own: the bulk paths
(:mod:`gruserve.sessions.bulk._batch`, :mod:`gruserve.sessions.bulk._block`) and version
upgrades (:mod:`gruserve.sessions.upgrade`). They must take the same per-session locks,
count against the same limits, read through the same tenant fallback and count lost
compare-and-sets the same way as a single step, or the guarantees the service states
(arrival order, exactly-once numbers, tenant scoping) would hold on one path and not on
another. :class:`SessionParts` is that shared part, named once: the service builds it and
the siblings take it from ``service.parts`` instead of reaching into the service's
private attributes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from gruserve.errors import SessionNotFound
from gruserve.metrics import Metrics
from gruserve.runtime.batcher import Batcher
from gruserve.runtime.limits import WorkLimits
from gruserve.runtime.model import LoadedModel
from gruserve.runtime.signature import ModelSignature
from gruserve.runtime.validation import Chunk, check_chunk
from gruserve.sessions._locks import KeyedLocks
from gruserve.sessions.owner import ANYONE, Caller, legacy_key, tenant_of
from gruserve.sessions.store import SessionRecord, SessionStore


@dataclass(frozen=True, slots=True)
class SessionParts:
    """The collaborators every way of stepping a session uses.

    Attributes:
        store: where records live (memory, Redis or a Redis Cluster).
        batchers: one batcher per served model name (or per version: ``.of(model)``).
        locks: the per-session FIFO locks of this process, by store key.
        clock: Unix-seconds clock (records' times, expiry).
        limits: work per request (a step's reply size).
        metrics: collectors, or None.
        max_timesteps: per-request timesteps limit.
        max_attempts: compare-and-set attempts before giving up with SessionConflict.
    """

    store: SessionStore
    batchers: Mapping[str, Batcher]
    locks: KeyedLocks
    clock: Callable[[], float]
    limits: WorkLimits
    metrics: Metrics | None
    max_timesteps: int
    max_attempts: int

    def batcher(self, model: LoadedModel) -> Batcher:
        """The batcher that runs ``model`` (its version's, where batchers are per version)."""
        of = getattr(self.batchers, "of", None)  # runtime.versions.Batchers: per version
        return of(model) if of is not None else self.batchers[model.name]

    def chunk(self, sig: ModelSignature, inputs: np.ndarray, mask: np.ndarray | None) -> Chunk:
        """A step's checked arrays; refused (413) if its reply would be too large."""
        chunk = check_chunk(sig, inputs, mask, self.max_timesteps)
        self.limits.check_reply(sig, 1, chunk.timesteps)
        return chunk

    def conflict(self) -> None:
        """Count one lost compare-and-set (the step re-reads and runs again)."""
        if self.metrics is not None:
            self.metrics.cas_conflicts.inc()

    def missed(self) -> None:
        """Count one step that could not go on from its kept record (it reads and runs
        again; not a conflict: nobody raced it, its base was only older than this server
        knew)."""
        if self.metrics is not None:
            self.metrics.recent_misses.inc()

    async def fetch(self, key: str) -> SessionRecord:
        """The record at store key ``key``, or the one its tenant had there before
        namespaces (:func:`~gruserve.sessions.owner.legacy_key`; one more read, on a miss
        only). Every lookup of a session by a client's id goes through here.

        Raises:
            SessionNotFound: neither exists (or the old one is another tenant's).
        """
        try:
            return await self.store.get(key)
        except SessionNotFound:
            old = legacy_key(key)
            if old is None:
                raise
        try:
            record = await self.store.get(old)
        except SessionNotFound:
            raise SessionNotFound(key) from None
        if record.owner != tenant_of(key):
            raise SessionNotFound(key)
        return record


def seen(record: SessionRecord, caller: Caller) -> SessionRecord:
    """``record`` if ``caller`` may see it; otherwise it does not exist for them."""
    if caller is not ANYONE and not caller.sees(record.owner):
        raise SessionNotFound(record.session_id)
    return record
