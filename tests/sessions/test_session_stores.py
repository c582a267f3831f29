"""Both session stores against one contract: create, read, compare-and-set, expiry, limits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from gruserve.errors import SessionExists, SessionNotFound, TooManySessions
from gruserve.sessions.memory import MemorySessionStore
from gruserve.sessions.redis_store import RedisSessionStore
from gruserve.sessions.store import SessionRecord, SessionStore


def _make(url: str, ttl_s: float = 60.0, max_sessions: int = 100) -> Any:
    if url == "memory":
        return MemorySessionStore(ttl_s, max_sessions)
    return RedisSessionStore(url, ttl_s, max_sessions)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[SessionStore]:
    made = _make(store_url)
    yield made
    await made.close()


def _record(sid: str = "s1", units: int = 5) -> SessionRecord:
    now = time.time()
    return SessionRecord(
        sid, "m", 3, np.arange(units, dtype=np.float32), created_at=now, last_used_at=now
    )


async def test_round_trip_and_compare_and_set(store: SessionStore) -> None:
    record = _record()
    await store.create(record)
    with pytest.raises(SessionExists):
        await store.create(record)
    got = await store.get("s1")
    assert (got.model, got.version, got.step, got.revision) == ("m", 3, 0, 0)
    np.testing.assert_array_equal(got.state, record.state)
    assert got.state.dtype == np.float32

    advanced = got.advanced(got.state + 1, timesteps=4, now=time.time(), result=b"{}")
    assert await store.compare_and_set(advanced, expected_revision=0)
    assert not await store.compare_and_set(
        advanced.advanced(advanced.state, 1, time.time()), 0
    )  # stale
    got = await store.get("s1")
    assert (got.step, got.timesteps, got.revision, got.last_result) == (1, 4, 1, b"{}")
    np.testing.assert_array_equal(got.state, record.state + 1)
    assert await store.count() == 1

    await store.delete("s1")
    for call in (store.get("s1"), store.delete("s1"), store.compare_and_set(advanced, 1)):
        with pytest.raises(SessionNotFound):
            await call
    await store.ping()


async def test_expiry_counts_from_the_last_write(store_url: str) -> None:
    store = _make(store_url, ttl_s=0.4)
    try:
        await store.create(_record("idle"))
        await store.create(_record("busy"))
        for _ in range(3):
            await asyncio.sleep(0.2)
            busy = await store.get("busy")
            assert await store.compare_and_set(
                busy.advanced(busy.state, 1, time.time()), busy.revision
            )
        with pytest.raises(SessionNotFound):
            await store.get("idle")
        assert (await store.get("busy")).step == 3
        assert await store.count() == 1
    finally:
        await store.close()


async def test_max_sessions(store_url: str) -> None:
    store = _make(store_url, ttl_s=0.3, max_sessions=2)
    try:
        await store.create(_record("a"))
        await store.create(_record("b"))
        with pytest.raises(TooManySessions, match="2 sessions"):
            await store.create(_record("c"))
        await store.delete("a")
        await store.create(_record("c"))
        await asyncio.sleep(0.4)  # expired sessions free their places
        await store.create(_record("d"))
        await store.create(_record("e"))
    finally:
        await store.close()


async def test_two_redis_clients_cannot_both_advance_a_step(redis_url: str) -> None:
    """Two replicas that read the same revision race to write it: exactly one wins each round."""
    replicas = [RedisSessionStore(redis_url, 60, 100), RedisSessionStore(redis_url, 60, 100)]
    try:
        await replicas[0].create(_record())
        for _ in range(5):
            seen = [await r.get("s1") for r in replicas]
            assert seen[0].revision == seen[1].revision
            wins = await asyncio.gather(
                *(
                    r.compare_and_set(s.advanced(s.state + i + 1, 1, time.time()), s.revision)
                    for i, (r, s) in enumerate(zip(replicas, seen, strict=True))
                )
            )
            assert sorted(wins) == [False, True]
        assert (await replicas[1].get("s1")).step == 5
        ttl = await replicas[0]._redis.pttl("gruserve:session:s1")
        assert 0 < ttl <= 60_000
    finally:
        for r in replicas:
            await r.close()
