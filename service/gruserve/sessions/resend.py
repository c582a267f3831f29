"""Exactly-once creates: a resent create is answered as the original, a taken id is not.

A create can fail after its write landed. With ``GRUSERVE_STORE_MIN_REPLICAS`` the Redis
master stores the record, then ``WAIT`` counts too few replicas and the client gets 503,
which tells it to resend. The resend finds the id taken. Answering it 409
``SessionExists`` would turn the 503's "retry" into a dead end, so a taken id counts as
the same create when the stored record can only be what that create wrote:

- the same owner (tenant), model and version, and the same initial state;
- never written since: step 0 and revision 0 (a step or a reset bumps the revision).

Such a resend is answered with the stored record (201 and the original's body, its
``created_at`` included); anything else stays a collision (409). Two clients of one tenant
that create the same id with the same state at once both get 201 and share the session:
their creates cannot be told apart, and either one alone would have made it.

Before the answer, the stored record is written again unchanged (a compare-and-set at its
own revision), so the resend is acknowledged only as any write is: once the replicas it
needs have the record. A resend while the replica is still away gets 503 again, never a
201 a failover could take back. The rule is the store's business only through
:class:`~gruserve.sessions.store.SessionStore`'s public methods, so the memory store
answers resends exactly as Redis does.
"""

from __future__ import annotations

import numpy as np

from gruserve.errors import SessionConflict, SessionExists, SessionNotFound
from gruserve.sessions.store import SessionRecord, SessionStore


def same_create(stored: SessionRecord, wanted: SessionRecord) -> bool:
    """Whether ``stored`` is what the create of ``wanted`` would have written (and nothing
    has written it since)."""
    return (
        stored.owner == wanted.owner
        and stored.model == wanted.model
        and stored.version == wanted.version
        and stored.step == 0
        and stored.revision == 0
        and stored.state.shape == wanted.state.shape
        and bool(np.array_equal(stored.state, wanted.state))
    )


async def create_once(store: SessionStore, record: SessionRecord, attempts: int) -> SessionRecord:
    """Create ``record``, or confirm the record an earlier send of the same create stored.

    Args:
        store: the session store.
        record: the new session (``session_id`` is its store key).
        attempts: how often to retry when the id is freed or written meanwhile.

    Returns:
        The session as stored: ``record``, or the earlier create's record.

    Raises:
        SessionExists: the id holds a session this create did not make.
        SessionConflict: the id kept changing under every attempt.
        StoreUnavailable, TooManySessions: as the store's create raises them.
    """
    for _ in range(attempts):
        try:
            await store.create(record)
            return record
        except SessionExists:
            pass
        try:
            stored = await store.get(record.session_id)
        except SessionNotFound:  # deleted or expired meanwhile: create it anew
            continue
        if not same_create(stored, record):
            raise SessionExists(record.session_id)
        try:
            if await store.compare_and_set(stored, stored.revision):
                return stored
        except SessionNotFound:
            continue
    raise SessionConflict(record.session_id, attempts)
