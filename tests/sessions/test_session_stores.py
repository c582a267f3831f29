"""Both session stores against one contract: create, read, compare-and-set, expiry, limits."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from conftest import all_instances, past
from gruserve.errors import SessionExists, SessionNotFound, TooManySessions
from gruserve.metrics import Metrics
from gruserve.sessions import memory as memory_module
from gruserve.sessions.events import SessionEvents
from gruserve.sessions.memory import MemorySessionStore
from gruserve.sessions.redis_store import RedisSessionStore
from gruserve.sessions.redis_store import store as redis_module
from gruserve.sessions.store import SessionPage, SessionRecord, SessionStore

FIELDS = "fields+"
"""Marks a Redis URL whose store writes the field-by-field layout of servers before 0.2.0
(``GRUSERVE_STORE_PACKED_RECORDS=false``); the default writes packed records."""
SHORT_S = 1.5
"""The idle TTL (and half the lifetime) of the expiry tests: short enough to wait out, long
enough that what must still live is checked at least a second before its end however busy
the machine (creating a cluster client alone has taken most of a second there). What must
have expired is checked only once its end has passed (``past``)."""


def _make(url: str, ttl_s: float = 60.0, max_sessions: int = 100) -> Any:
    if url == "memory":
        return MemorySessionStore(ttl_s, max_sessions)
    if url.startswith(FIELDS):
        return RedisSessionStore(url.removeprefix(FIELDS), ttl_s, max_sessions, packed=False)
    return RedisSessionStore(url, ttl_s, max_sessions)


@pytest.fixture(params=["memory", "redis", "cluster", "fields-redis", "fields-cluster"])
def any_store_url(request: pytest.FixtureRequest) -> str:
    """Runs a test once per session store, once on a Redis Cluster, for the behaviour a
    cluster keeps exactly (limits and LRU hold per key bucket there: README, Redis Cluster),
    and on both with the record layout of servers before 0.2.0."""
    if request.param == "memory":
        return "memory"
    if request.param.startswith("fields-"):
        return FIELDS + str(request.getfixturevalue(f"{request.param.removeprefix('fields-')}_url"))
    return str(request.getfixturevalue(f"{request.param}_url"))


@pytest.fixture
async def store(any_store_url: str) -> AsyncIterator[SessionStore]:
    made = _make(any_store_url)
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


async def test_many_reads_and_writes_decide_each_session_on_its_own(store: Any) -> None:
    """``get_many`` and ``compare_and_set_many``: per session what ``get`` and
    ``compare_and_set`` answer (a record or SessionNotFound; True, False for a stale
    revision, or SessionNotFound), in order, in one call (Redis: more than one chunk)."""
    ids = [f"s{i}" for i in range(5)]
    for sid in ids:
        await store.create(_record(sid))
    got = await store.get_many(["s3", "nobody", "s0"])
    assert [r.session_id for r in (got[0], got[2])] == ["s3", "s0"]
    assert isinstance(got[1], SessionNotFound)
    now = time.time()
    writes = [(r.advanced(r.state + 1, 1, now), r.revision) for r in [got[0], got[2]]]
    stale = got[0].advanced(got[0].state + 2, 1, now)
    gone = _record("nobody").advanced(np.zeros(5, np.float32), 1, now)
    answers = await store.compare_and_set_many([*writes, (stale, 0), (gone, 0)])
    assert answers[:3] == [True, True, False] and isinstance(answers[3], SessionNotFound)
    assert [(await store.get(s)).step for s in ids] == [1, 0, 0, 1, 0]
    np.testing.assert_array_equal((await store.get("s3")).state, _record().state + 1)


async def test_redis_many_calls_go_in_chunks(redis_url: str) -> None:
    """More reads or writes than ``batch_limit`` go as several calls, answered in order."""
    store = RedisSessionStore(redis_url, 60, 100, batch_limit=2)
    try:
        ids = [f"s{i}" for i in range(5)]
        for sid in ids:
            await store.create(_record(sid))
        got = all_instances(SessionRecord, await store.get_many(list(reversed(ids))))
        assert [r.session_id for r in got] == list(reversed(ids))
        now = time.time()
        answers = await store.compare_and_set_many([(r.advanced(r.state, 1, now), 0) for r in got])
        assert answers == [True] * 5
        assert [(await store.get(s)).revision for s in ids] == [1] * 5
    finally:
        await store.close()


async def test_the_owner_is_kept_through_every_write(store: SessionStore) -> None:
    """The tenant that created a session stays its owner after steps and resets."""
    await store.create(dataclasses.replace(_record("owned"), owner="acme"))
    await store.create(_record("unowned"))
    got = await store.get("owned")
    assert got.owner == "acme" and (await store.get("unowned")).owner == ""
    advanced = got.advanced(got.state + 1, 1, time.time())
    assert await store.compare_and_set(advanced, 0)
    reset = (await store.get("owned")).reset(got.state, time.time())
    assert await store.compare_and_set(reset, 1)
    assert (await store.get("owned")).owner == "acme"


async def test_expiry_counts_from_the_last_write(any_store_url: str) -> None:
    # "busy" is written every 0.2 s (each write well within its TTL of the one before) until
    # "idle", never written, is past its TTL
    store = _make(any_store_url, ttl_s=SHORT_S)
    try:
        await store.create(_record("idle"))
        idle_until = time.time() + SHORT_S  # after the write: past Redis's deadline too
        await store.create(_record("busy"))
        steps = 0
        while steps < 3 or time.time() <= idle_until:
            await asyncio.sleep(0.2)
            busy = await store.get("busy")
            assert await store.compare_and_set(
                busy.advanced(busy.state, 1, time.time()), busy.revision
            )
            steps += 1
        await past(idle_until)
        with pytest.raises(SessionNotFound):
            await store.get("idle")
        assert (await store.get("busy")).step == steps
        assert await store.count() == 1
    finally:
        await store.close()


async def test_max_sessions(store_url: str) -> None:
    store = _make(store_url, ttl_s=SHORT_S, max_sessions=2)
    try:
        await store.create(_record("a"))
        await store.create(_record("b"))
        with pytest.raises(TooManySessions, match="2 sessions"):
            await store.create(_record("c"))
        await store.delete("a")
        await store.create(_record("c"))
        await past(time.time() + SHORT_S)  # expired sessions free their places
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


# -- lifecycle: lifetime, eviction, what is reported ------------------------------------------
class Reported(SessionEvents):
    """Records what a store reports instead of counting it."""

    def __init__(self) -> None:
        super().__init__()
        self.expired_ids: dict[str, list[str]] = {"idle": [], "lifetime": []}
        self.evicted_ids: list[str] = []

    def expired(self, reason: str, session_ids: Any) -> None:
        self.expired_ids[reason] += list(session_ids)

    def evicted(self, session_ids: Any) -> None:
        self.evicted_ids += list(session_ids)


def _lifecycle(url: str, events: SessionEvents, **kwargs: Any) -> Any:
    ttl_s, max_sessions = kwargs.pop("ttl_s", 60.0), kwargs.pop("max_sessions", 100)
    if url == "memory":
        return MemorySessionStore(ttl_s, max_sessions, events=events, **kwargs)
    if url.startswith(FIELDS):
        url, kwargs = url.removeprefix(FIELDS), {**kwargs, "packed": False}
    return RedisSessionStore(url, ttl_s, max_sessions, events=events, **kwargs)


async def test_a_busy_session_still_ends_at_its_lifetime(any_store_url: str) -> None:
    """Writes renew a session's idle time, never its lifetime; a restart (v2 sequence_start:
    a new ``created_at``) gives it a new one. The three are created at one ``born`` with a
    lifetime of 2 * SHORT_S and an idle TTL never near; the writes come at once, the restart
    half a lifetime later, and every check of a session that must live comes at least half
    a lifetime before its end."""
    events = Reported()
    lifetime = 2 * SHORT_S
    store = _lifecycle(any_store_url, events, ttl_s=60.0, max_lifetime_s=lifetime)
    try:
        await store.count()  # connected first: a cluster client's first call maps the cluster
        born = time.time()
        for sid in ("busy", "also", "restarted"):
            await store.create(dataclasses.replace(_record(sid), created_at=born))
        for _ in range(3):  # in use all along
            busy = await store.get("busy")
            assert await store.compare_and_set(
                busy.advanced(busy.state, 1, time.time()), busy.revision
            )
        await past(born + lifetime / 2)
        current = await store.get("restarted")
        fresh = dataclasses.replace(current, revision=current.revision + 1, created_at=time.time())
        assert await store.compare_and_set(fresh, current.revision)
        await past(born + lifetime)  # the restart's new end is half a lifetime away
        with pytest.raises(SessionNotFound):
            await store.get("busy")
        assert await store.count() == 1  # the sweep finds "also"
        assert sorted(events.expired_ids["lifetime"]) == ["also", "busy"]
        assert events.expired_ids["idle"] == []
        restarted = await store.get("restarted")
        assert (restarted.revision, restarted.step) == (1, 0)
    finally:
        await store.close()


async def test_idle_expiry_is_reported_once(any_store_url: str) -> None:
    events = Reported()
    store = _lifecycle(any_store_url, events, ttl_s=0.2)
    try:
        for sid in ("a", "b", "c"):
            await store.create(_record(sid))
        await asyncio.sleep(0.3)
        with pytest.raises(SessionNotFound):
            await store.get("a")
        assert await store.count() == 0
        assert await store.count() == 0
        reported = events.expired_ids["idle"]
        assert set(reported) >= {"b", "c"} and len(reported) == len(set(reported))
    finally:
        await store.close()


async def test_a_full_lru_store_evicts_the_least_recently_used(store_url: str) -> None:
    events = Reported()
    store = _lifecycle(store_url, events, max_sessions=3, eviction="lru")
    try:
        for sid in ("old", "mid", "new"):
            await store.create(_record(sid))
            await asyncio.sleep(0.01)
        old = await store.get("old")  # a write makes "old" the most recently used
        assert await store.compare_and_set(old.advanced(old.state, 1, time.time()), 0)
        await store.create(_record("fourth"))
        assert events.evicted_ids == ["mid"]
        with pytest.raises(SessionNotFound):
            await store.get("mid")
        assert await store.count() == 3
        await store.create(_record("fifth"))
        assert events.evicted_ids == ["mid", "new"]
        with pytest.raises(SessionExists):  # an existing id is still refused, nothing evicted
            await store.create(_record("old"))
        assert events.evicted_ids == ["mid", "new"]
    finally:
        await store.close()


async def test_the_default_store_rejects_instead_of_evicting(store_url: str) -> None:
    events = Reported()
    store = _lifecycle(store_url, events, max_sessions=1)
    try:
        await store.create(_record("only"))
        with pytest.raises(TooManySessions):
            await store.create(_record("more"))
        assert events.evicted_ids == [] and (await store.get("only")).session_id == "only"
    finally:
        await store.close()


async def test_events_count_in_metrics_and_log_ids_never_states(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics(CollectorRegistry())
    clock = [time.time()]  # the store's clock: "first" is evicted, never expired, however slow
    store = MemorySessionStore(
        0.1, 1, lambda: clock[0], eviction="lru", events=SessionEvents(metrics)
    )
    caplog.set_level(logging.INFO, "gruserve.sessions")
    await store.create(_record("first", units=3))
    await store.create(_record("second", units=3))  # evicts "first"
    clock[0] = time.time() + 0.15  # past "second"'s TTL
    assert await store.count() == 0  # "second" expired
    assert metrics.sessions_evicted._value.get() == 1
    assert metrics.sessions_expired.labels("idle")._value.get() == 1
    assert metrics.sessions_expired.labels("lifetime")._value.get() == 0
    assert "evicted" in caplog.text and "'first'" not in caplog.text and "first" in caplog.text
    assert "expired (idle): second" in caplog.text
    assert "0.0, 1.0, 2.0" not in caplog.text and "[0. 1. 2.]" not in caplog.text


# -- listing ----------------------------------------------------------------------------------
async def test_pages_are_stable_while_sessions_come_and_go(any_store_url: str) -> None:
    store = _lifecycle(any_store_url, SessionEvents())
    try:
        ids = [f"s{i:02d}" for i in range(25)]
        for sid in ids:
            record = _record(sid)
            if sid.endswith("7"):
                record = dataclasses.replace(record, model="other")
            await store.create(record)
        first = await store.page(None, 10, None)
        assert [s.session_id for s in first.sessions] == ids[:10]
        assert first.next_cursor == "s09"
        # created and deleted meanwhile: ids before the cursor never come back, none is skipped
        await store.delete("s03")
        await store.delete("s12")
        await store.create(_record("s005"))  # sorts before the cursor
        await store.create(_record("s155"))  # after it
        rest, cursor = [], first.next_cursor
        while cursor is not None:
            page = await store.page(cursor, 10, None)
            rest += [s.session_id for s in page.sessions]
            cursor = page.next_cursor
        assert rest == sorted([*(i for i in ids[10:] if i != "s12"), "s155"])
        others = await store.page(None, 100, "other")
        assert [s.session_id for s in others.sessions] == ["s07", "s17"]
        assert others.next_cursor is None
        summary = others.sessions[0]
        assert (summary.model, summary.version, summary.step) == ("other", 3, 0)
        assert not hasattr(summary, "state")
        assert (await store.page("s24", 10, None)) == SessionPage([], None)
    finally:
        await store.close()


async def test_a_filtered_page_examines_a_bounded_number_of_ids(
    monkeypatch: pytest.MonkeyPatch, store_url: str
) -> None:
    monkeypatch.setattr(memory_module, "SCAN_PER_PAGE", 4)
    monkeypatch.setattr(redis_module, "SCAN_PER_PAGE_REDIS", 4)
    store = _lifecycle(store_url, SessionEvents())
    try:
        for i in range(10):
            await store.create(_record(f"s{i}"))
        page = await store.page(None, 5, "nobody")
        assert page == SessionPage([], "s3")  # nothing found yet, but not the end
        page = await store.page("s7", 5, "nobody")
        assert page == SessionPage([], None)
    finally:
        await store.close()


# -- snapshots (memory store) -------------------------------------------------------------------
async def test_records_and_restore_keep_what_has_not_expired() -> None:
    now = time.time()
    clock = [now]
    store = MemorySessionStore(10.0, 3, lambda: clock[0], max_lifetime_s=100.0)
    fresh = [
        dataclasses.replace(_record(f"s{i}"), created_at=now - 50, last_used_at=now - i)
        for i in range(4)
    ]
    stale = dataclasses.replace(_record("idle"), last_used_at=now - 11)
    old = dataclasses.replace(_record("old"), created_at=now - 101, last_used_at=now)
    added = store.restore([*fresh, stale, old])
    # expired ones dropped; of the rest, the 3 most recently used fit
    assert sorted(r.session_id for r in added) == ["s0", "s1", "s2"]
    assert [r.session_id for r in store.records()] == ["s2", "s1", "s0"]  # least recent first
    clock[0] = now + 8.5  # s2 (last used 2 s before "now") is past its idle TTL
    assert [r.session_id for r in store.records()] == ["s1", "s0"]
    clock[0] = now + 51  # and lifetime (created 50 s before "now") ends the rest
    assert await store.count() == 0
