"""The session service: arrival order within a process, compare-and-set across replicas."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from gruserve.errors import SequenceNotStarted, SessionNotFound
from gruserve.metrics import Metrics
from gruserve.runtime.batcher import Batcher
from gruserve.runtime.registry import ModelRegistry
from gruserve.sessions.memory import MemorySessionStore
from gruserve.sessions.redis_store import RedisSessionStore
from gruserve.sessions.service import SessionService

ATOL = 1e-5


def _service(models_dir: Path, store: Any, executor: ThreadPoolExecutor) -> SessionService:
    registry = ModelRegistry.load(models_dir, ["CPUExecutionProvider"])
    model = registry.get("stacked")
    batchers = {"stacked": Batcher(model, executor, max_batch_size=8, max_delay_s=0.001)}
    return SessionService(
        registry, batchers, store, max_timesteps=100, metrics=Metrics(CollectorRegistry())
    )


@pytest.fixture
async def executor() -> AsyncIterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as pool:
        yield pool


async def test_steps_apply_in_arrival_order(
    models_dir: Path,
    tiny_models: dict[str, Any],
    store_url: str,
    executor: ThreadPoolExecutor,
    rng: np.random.Generator,
) -> None:
    store = (
        MemorySessionStore(60, 10)
        if store_url == "memory"
        else RedisSessionStore(store_url, 60, 10)
    )
    service = _service(models_dir, store, executor)
    record = await service.create("stacked", "ordered")
    x = rng.normal(size=(30, 3)).astype(np.float32)
    tasks = [asyncio.ensure_future(service.step(record.session_id, x[i])) for i in range(30)]
    results = await asyncio.gather(*tasks)
    assert [r.step for r in results] == list(range(1, 31))  # the order the requests arrived in
    outs, states = tiny_models["stacked"].reference(x[None])
    np.testing.assert_allclose(
        np.stack([r.outputs["outputs"] for r in results]), outs[0][0], atol=ATOL
    )
    final = service.states_of(await service.get("ordered"))
    for key in states:
        np.testing.assert_allclose(final[key], states[key][0], atol=ATOL)
    await store.close()


async def test_two_replicas_continue_each_other_without_losing_steps(
    models_dir: Path, tiny_models: dict[str, Any], redis_url: str, executor: ThreadPoolExecutor
) -> None:
    """Two services (two replicas' worth of objects) on one Redis hammer one session."""
    stores = [RedisSessionStore(redis_url, 60, 10), RedisSessionStore(redis_url, 60, 10)]
    replicas = [_service(models_dir, s, executor) for s in stores]
    await replicas[0].create("stacked", "shared")
    x = np.array([0.4, -0.1, 0.7], np.float32)
    results = await asyncio.gather(*(replicas[i % 2].step("shared", x) for i in range(40)))
    assert sorted(r.step for r in results) == list(range(1, 41))  # none lost, none applied twice
    _, states = tiny_models["stacked"].reference(np.tile(x, (1, 40, 1)))
    final = replicas[1].states_of(await replicas[1].get("shared"))
    for key in states:
        np.testing.assert_allclose(final[key], states[key][0], atol=ATOL)
    conflicts = sum(r._metrics.cas_conflicts._value.get() for r in replicas)  # type: ignore[union-attr]
    assert conflicts > 0  # the race really happened and was resolved by re-reading
    for s in stores:
        await s.close()


async def test_sequence_start_takes_over_the_id_and_later_steps_check_the_model(
    models_dir: Path, tiny_models: dict[str, Any], executor: ThreadPoolExecutor
) -> None:
    """A v2 start replaces a session another model holds under the id; a plain step refuses it."""
    store = MemorySessionStore(60, 10)
    service = _service(models_dir, store, executor)
    x = np.array([[0.4, -0.1, 0.7]], np.float32)
    await service.create("simple", "v2:stacked:1")
    with pytest.raises(SequenceNotStarted):
        await service.sequence_step("stacked", "v2:stacked:1", x, start=False, end=False)
    result = await service.sequence_step("stacked", "v2:stacked:1", x, start=True, end=False)
    assert (result.record.model, result.step) == ("stacked", 1)
    expected, _ = tiny_models["stacked"].reference(x[None])
    np.testing.assert_allclose(result.outputs["outputs"], expected[0][0], atol=ATOL)
    await service.sequence_step("stacked", "v2:stacked:1", x, start=False, end=True)
    with pytest.raises(SessionNotFound):
        await service.get("v2:stacked:1")


async def test_replicas_starting_one_sequence_at_once_both_succeed(
    models_dir: Path, tiny_models: dict[str, Any], redis_url: str, executor: ThreadPoolExecutor
) -> None:
    stores = [RedisSessionStore(redis_url, 60, 10), RedisSessionStore(redis_url, 60, 10)]
    replicas = [_service(models_dir, s, executor) for s in stores]
    x = np.array([[0.4, -0.1, 0.7]], np.float32)
    results = await asyncio.gather(
        *(replicas[i % 2].sequence_step("stacked", "v2:stacked:7", x, start=True, end=False)
          for i in range(6))
    )
    assert all(r.record.model == "stacked" for r in results)  # each start restarted or created
    assert (await replicas[0].get("v2:stacked:7")).step >= 1
    for s in stores:
        await s.close()
