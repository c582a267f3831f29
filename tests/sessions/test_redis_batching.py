"""Store I/O batched with the model work: a batch of steps costs one read and one write call.

Counted by the real Redis (``INFO commandstats``): before batching, every step made one
``HGETALL`` and one ``EVALSHA`` of its own (128 calls for the 64 steps below).
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

from gruserve.errors import SessionNotFound
from gruserve.metrics import Metrics
from gruserve.runtime.batcher import Batcher
from gruserve.runtime.registry import ModelRegistry
from gruserve.sessions.redis_store import RedisSessionStore
from gruserve.sessions.service import SessionService
from gruserve.sessions.store import SessionRecord

ATOL = 1e-5


CALLS = ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_hgetall")
"""The commands that read or write a session from a client (commandstats also counts the
commands that scripts run inside, so those are left out)."""


def _calls(url: str) -> int:
    """Script calls and hash reads clients have sent to Redis so far."""
    with redis.Redis.from_url(url) as client:
        stats = client.info("commandstats")
    return sum(int(stats[k]["calls"]) for k in CALLS if k in stats)


def _record(sid: str) -> SessionRecord:
    now = time.time()
    return SessionRecord(
        sid, "m", 1, np.full(4, len(sid), np.float32), created_at=now, last_used_at=now
    )


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisSessionStore]:
    made = RedisSessionStore(redis_url, 60, 1000)
    for i in range(64):
        await made.create(_record(f"s{i}"))
    await made.get("s0")  # the read script is loaded: what follows is counted alone
    yield made
    await made.close()


async def test_concurrent_reads_are_one_call(store: RedisSessionStore, redis_url: str) -> None:
    before = _calls(redis_url)
    ids = [f"s{i}" for i in range(64)] + ["missing"]
    got = await asyncio.gather(*(store.get(sid) for sid in ids), return_exceptions=True)
    assert _calls(redis_url) - before == 1
    for sid, record in zip(ids[:-1], got[:-1], strict=True):
        assert isinstance(record, SessionRecord) and record.session_id == sid
        np.testing.assert_array_equal(record.state, np.full(4, len(sid), np.float32))
    assert isinstance(got[-1], SessionNotFound)  # only the missing one fails


async def test_concurrent_writes_are_one_call_each_decided_alone(
    store: RedisSessionStore, redis_url: str
) -> None:
    records = await asyncio.gather(*(store.get(f"s{i}") for i in range(64)))
    await store.compare_and_set(records[0].advanced(records[0].state, 1, time.time()), 0)
    await store.delete("s1")  # now the writes of s0 (stale) and s1 (gone) must fail alone
    writes = [r.advanced(r.state + 1, 1, time.time(), b"kept") for r in records]
    assert await store.compare_and_set(writes[2], 0)  # (loads the script before the count)
    before = _calls(redis_url)
    outcomes = await asyncio.gather(
        *(store.compare_and_set(w, 0) for w in writes), return_exceptions=True
    )
    assert _calls(redis_url) - before == 1
    assert outcomes[0] is False  # lost the race
    assert isinstance(outcomes[1], SessionNotFound)
    assert outcomes[2] is False  # revision 1 written already, by another writer
    assert all(o is True for o in outcomes[3:])
    for i in (2, 3, 63):
        got = await store.get(f"s{i}")
        assert (got.step, got.revision, got.last_result) == (1, 1, b"kept")
        np.testing.assert_array_equal(got.state, records[i].state + 1)
    assert (await store.get("s0")).revision == 1 and await store.count() == 63


async def test_a_batch_of_steps_costs_a_few_calls_not_two_per_step(
    models_dir: Path, tiny_models: dict[str, Any], redis_url: str, rng: np.random.Generator
) -> None:
    store = RedisSessionStore(redis_url, 60, 1000)
    registry = ModelRegistry.load(models_dir, ["CPUExecutionProvider"])
    executor = ThreadPoolExecutor(1)
    batcher = Batcher(registry.get("stacked"), executor, max_batch_size=64, max_delay_s=0.001)
    service = SessionService(
        registry,
        {"stacked": batcher},
        store,
        max_timesteps=100,
        metrics=Metrics(CollectorRegistry()),
    )
    ids = [f"b{i}" for i in range(64)]
    x = rng.normal(size=(64, 2, 3)).astype(np.float32)
    try:
        for sid in ids:
            await service.create("stacked", sid)
        await service.step("b0", x[0, :1])  # warm-up: scripts loaded, the model run once
        await service.reset("b0")
        before = _calls(redis_url)
        results = await asyncio.gather(*(service.step(sid, x[i]) for i, sid in enumerate(ids)))
        calls = _calls(redis_url) - before
        finals = [service.states_of(await service.get(sid)) for sid in ids]
    finally:
        await batcher.close()
        await store.close()
        executor.shutdown()
    # one read wave; the first step finds the model idle and runs alone, the other 63 form the
    # next batch: two write waves (a busier machine could only merge waves, never split them)
    assert calls <= 4, calls
    outs, states = tiny_models["stacked"].reference(x)
    np.testing.assert_allclose(
        np.stack([r.outputs["outputs"] for r in results]), outs[0], atol=ATOL
    )
    for i, final in enumerate(finals):
        for key in states:
            np.testing.assert_allclose(final[key], states[key][i], atol=ATOL)
