"""Sessions created and ended by their own steps, and expired ids swept off the request path.

Stores: a compare-and-set may create its session (expected revision ``CREATE``) and end it,
counted against ``max_sessions`` exactly. Service: a step with a :class:`Lifecycle` gives
the outputs an explicit create + steps + delete gives; a create-step resent with its number
creates one session and answers the same; ending twice is ``SessionNotFound``; a create
naming a taken id (another model, another tenant) is ``SessionExists``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from prometheus_client import CollectorRegistry

from conftest import past
from gruserve.errors import SessionExists, SessionNotFound, TooManySessions
from gruserve.metrics import Metrics
from gruserve.runtime.batcher import Batcher
from gruserve.runtime.registry import ModelRegistry
from gruserve.sessions.events import SessionEvents
from gruserve.sessions.lifecycle import Create, Lifecycle
from gruserve.sessions.memory import MemorySessionStore
from gruserve.sessions.owner import Caller
from gruserve.sessions.redis_store import RedisSessionStore
from gruserve.sessions.service import SessionService
from gruserve.sessions.store import CREATE, SessionRecord
from gruserve.sessions.sweeper import Sweeper

ATOL = 1e-5


class Reported(SessionEvents):
    def __init__(self) -> None:
        super().__init__()
        self.expired_ids: list[str] = []
        self.evicted_ids: list[str] = []

    def expired(self, reason: str, session_ids: Any) -> None:
        self.expired_ids += list(session_ids)

    def evicted(self, session_ids: Any) -> None:
        self.evicted_ids += list(session_ids)


def _store(url: str, ttl_s: float = 60.0, max_sessions: int = 100, **kwargs: Any) -> Any:
    if url == "memory":
        return MemorySessionStore(ttl_s, max_sessions, **kwargs)
    return RedisSessionStore(url, ttl_s, max_sessions, prefix=f"lc{time.monotonic_ns()}:", **kwargs)


def _record(sid: str) -> SessionRecord:
    now = time.time()
    return SessionRecord(sid, "m", 1, np.zeros(4, np.float32), created_at=now, last_used_at=now)


def _indexed(store: Any) -> int:
    """Ids the store's index holds, expired ones not yet swept included."""
    if isinstance(store, MemorySessionStore):
        return len(store._records)
    return int(redis.Redis.from_url(store.url).zcard(store._keyspace.buckets[0].sets[0]))


# -- stores ----------------------------------------------------------------------------------
async def test_a_write_creates_if_absent_and_ends(store_url: str) -> None:
    store = _store(store_url)
    try:
        first = _record("a").advanced(np.ones(4, np.float32), 1, time.time())
        assert await store.compare_and_set(first, CREATE)
        stored = await store.get("a")
        assert (stored.step, stored.revision) == (1, 1)
        np.testing.assert_array_equal(stored.state, np.ones(4, np.float32))
        assert not await store.compare_and_set(first, CREATE)  # taken: lost, as a race is
        second = stored.advanced(stored.state, 1, time.time())
        assert await store.compare_and_set(second, stored.revision, end=True)
        with pytest.raises(SessionNotFound):
            await store.get("a")
        with pytest.raises(SessionNotFound):
            await store.compare_and_set(second, second.revision, end=True)
        assert await store.compare_and_set(_record("b"), CREATE, end=True)  # a one-step session
        with pytest.raises(SessionNotFound):
            await store.get("b")
        assert await store.count() == 0 and _indexed(store) == 0
    finally:
        await store.close()


async def test_a_creating_write_counts_against_max_sessions(store_url: str) -> None:
    store = _store(store_url, max_sessions=2)
    try:
        await store.create(_record("a"))
        assert await store.compare_and_set(_record("b"), CREATE)
        with pytest.raises(TooManySessions):
            await store.compare_and_set(_record("c"), CREATE)
        assert await store.compare_and_set(_record("c"), CREATE, end=True)  # takes no room
        assert await store.count() == 2
    finally:
        await store.close()
    events = Reported()
    lru = _store(store_url, max_sessions=2, eviction="lru", events=events)
    try:
        for sid in ("a", "b", "c"):
            assert await lru.compare_and_set(_record(sid), CREATE)
        assert events.evicted_ids == ["a"] and await lru.count() == 2
    finally:
        await lru.close()


async def test_creates_do_not_sweep_and_max_sessions_counts_live_ones(store_url: str) -> None:
    events = Reported()
    # c, d and e must live until the end: a TTL a busy machine cannot outlast meanwhile
    store = _store(store_url, ttl_s=1.5, max_sessions=3, events=events)
    try:
        for sid in ("a", "b"):
            await store.create(_record(sid))
        await past(time.time() + 1.5)  # a and b expire
        await store.create(_record("c"))  # room: no sweep on the request path
        assert _indexed(store) == 3 and events.expired_ids == []
        # full-looking: both kinds of create sweep first, so expired ids never count
        await store.create(_record("d"))
        assert await store.compare_and_set(_record("e"), CREATE)
        assert sorted(events.expired_ids) == ["a", "b"]
        with pytest.raises(TooManySessions):
            await store.create(_record("f"))
        with pytest.raises(TooManySessions):
            await store.compare_and_set(_record("f"), CREATE)
        assert await store.count() == 3
    finally:
        await store.close()


async def test_the_sweeper_forgets_expired_sessions_in_the_background(store_url: str) -> None:
    events = Reported()
    store = _store(store_url, ttl_s=0.2, events=events)
    sweeper = Sweeper(store, 0.05)
    try:
        for sid in ("a", "b", "c"):
            await store.create(_record(sid))
        sweeper.start()
        deadline = time.monotonic() + 30
        while len(events.expired_ids) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert sorted(events.expired_ids) == ["a", "b", "c"]  # nothing but the sweeper ran
        assert _indexed(store) == 0 and sweeper.sweeps >= 1
    finally:
        await sweeper.stop()
        await store.close()
    with pytest.raises(ValueError, match="interval_s > 0"):
        Sweeper(store, 0)


# -- the service -------------------------------------------------------------------------------
@pytest.fixture
async def service(
    models_dir: Path, tiny_models: dict[str, Any], store_url: str
) -> AsyncIterator[SessionService]:
    registry = ModelRegistry.load(models_dir, ["CPUExecutionProvider"])
    store = _store(store_url)
    with ThreadPoolExecutor(2) as pool:
        batchers = {
            name: Batcher(registry.get(name), pool, max_batch_size=8, max_delay_s=0.001)
            for name in ("stacked", "simple")
        }
        yield SessionService(
            registry, batchers, store, max_timesteps=100, metrics=Metrics(CollectorRegistry())
        )
        await store.close()


CREATE_STACKED = Create("stacked")


async def test_in_band_lifecycle_equals_an_explicit_one(
    service: SessionService, tiny_models: dict[str, Any], rng: np.random.Generator
) -> None:
    x = rng.normal(size=(3, 2, 3)).astype(np.float32)
    await service.create("stacked", "explicit")
    explicit = [await service.step("explicit", x[i]) for i in range(3)]
    last_states = service.states_of(await service.get("explicit"))
    await service.delete("explicit")

    begun = await service.step("inband", x[0], lifecycle=Lifecycle(CREATE_STACKED))
    middle = await service.step("inband", x[1], lifecycle=Lifecycle(CREATE_STACKED))  # exists
    ended = await service.step("inband", x[2], lifecycle=Lifecycle(end=True, final_state=True))
    outs, states = tiny_models["stacked"].reference(x.reshape(1, 6, 3))
    for i, (a, b) in enumerate(zip(explicit, [begun, middle, ended], strict=True)):
        assert a.step == b.step == i + 1
        np.testing.assert_array_equal(a.outputs["outputs"], b.outputs["outputs"])
        np.testing.assert_allclose(b.outputs["outputs"], outs[0][0, 2 * i : 2 * i + 2], atol=ATOL)
    assert ended.states is not None and explicit[2].states is None
    for key in states:
        np.testing.assert_array_equal(ended.states[key], last_states[key])
        np.testing.assert_allclose(ended.states[key], states[key][0], atol=ATOL)
    with pytest.raises(SessionNotFound):
        await service.get("inband")
    with pytest.raises(SessionNotFound):  # ending twice: the second finds nothing
        await service.step("inband", x[2], lifecycle=Lifecycle(end=True))


async def test_one_request_sessions_and_initial_state(
    service: SessionService, rng: np.random.Generator
) -> None:
    x = rng.normal(size=(2, 3)).astype(np.float32)
    record = await service.create("stacked", "ref")
    initial = {k: v + 0.5 for k, v in service.states_of(record).items()}
    await service.reset("ref", initial)
    expected = await service.step("ref", x)
    whole = Lifecycle(Create("stacked", initial), end=True)
    for _ in range(2):  # the same one-request session twice: same numbers, nothing kept
        once = await service.step("once", x, lifecycle=whole)
        np.testing.assert_array_equal(once.outputs["outputs"], expected.outputs["outputs"])
        with pytest.raises(SessionNotFound):
            await service.get("once")
    assert await service.store.count() == 1


async def test_a_resent_create_step_answers_the_same_and_creates_one_session(
    service: SessionService, rng: np.random.Generator
) -> None:
    x = rng.normal(size=(2, 3)).astype(np.float32)
    first = await service.step("retried", x, step_number=0, lifecycle=Lifecycle(CREATE_STACKED))
    again = await service.step("retried", x, step_number=0, lifecycle=Lifecycle(CREATE_STACKED))
    assert first.step == again.step == 1
    np.testing.assert_array_equal(first.outputs["outputs"], again.outputs["outputs"])
    assert (await service.get("retried")).step == 1 and await service.store.count() == 1
    together = await asyncio.gather(  # two at once: one creates, the other is its resend
        *(
            service.step("raced", x, step_number=0, lifecycle=Lifecycle(CREATE_STACKED))
            for _ in range(2)
        )
    )
    assert [r.step for r in together] == [1, 1] and await service.store.count() == 2


async def test_a_create_naming_a_taken_id_is_refused(
    service: SessionService, rng: np.random.Generator
) -> None:
    x = rng.normal(size=(2, 3)).astype(np.float32)
    alice, bob = Caller("alice"), Caller("bob")
    await service.create("simple", "taken", caller=alice)
    with pytest.raises(SessionExists):  # another model
        await service.step("taken", x, lifecycle=Lifecycle(CREATE_STACKED), caller=alice)
    with pytest.raises(SessionNotFound):  # without create, bob cannot see alice's
        await service.step("taken", x, caller=bob)
    # another tenant's id is no conflict: bob's create makes bob's own "taken"
    made = await service.step("taken", x, lifecycle=Lifecycle(Create("simple")), caller=bob)
    assert made.step == 1 and made.record.owner == "bob"
    assert (await service.get("taken", alice)).step == 0
