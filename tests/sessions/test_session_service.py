"""The session service: arrival order within a process, compare-and-set across replicas."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from gruserve.errors import (
    InvalidInput,
    SequenceNotStarted,
    SessionNotFound,
    StepMismatch,
    StepOutOfOrder,
)
from gruserve.metrics import Metrics
from gruserve.runtime.batcher import Batcher, StepOutput
from gruserve.runtime.registry import ModelRegistry
from gruserve.sessions import sequences, snapshot
from gruserve.sessions.bulk import BulkStep, step_all
from gruserve.sessions.memory import MemorySessionStore
from gruserve.sessions.owner import ANYONE, Caller
from gruserve.sessions.redis_store import RedisSessionStore
from gruserve.sessions.service import SessionService, StepResult

ATOL = 1e-5


def _service(
    models_dir: Path, store: Any, executor: ThreadPoolExecutor, max_attempts: int = 16
) -> SessionService:
    registry = ModelRegistry.load(models_dir, ["CPUExecutionProvider"])
    model = registry.get("stacked")
    batchers = {"stacked": Batcher(model, executor, max_batch_size=8, max_delay_s=0.001)}
    return SessionService(
        registry,
        batchers,
        store,
        max_timesteps=100,
        metrics=Metrics(CollectorRegistry()),
        max_attempts=max_attempts,
    )


@pytest.fixture
async def two_stores(redis_url: str) -> AsyncIterator[list[RedisSessionStore]]:
    """Two replicas' stores on one Redis, closed even when the test fails (an unclosed one's
    connections would warn from the garbage collector during some later test)."""
    stores = [RedisSessionStore(redis_url, 60, 10), RedisSessionStore(redis_url, 60, 10)]
    yield stores
    for store in stores:
        await store.close()


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
    models_dir: Path,
    tiny_models: dict[str, Any],
    two_stores: list[RedisSessionStore],
    executor: ThreadPoolExecutor,
) -> None:
    """Two services (two replicas' worth of objects) on one Redis hammer one session.

    A step loses its compare-and-set only to a write of the other replica, which sends 20
    steps: with more attempts than that, every step gets through however the machine
    schedules the two (the default 16 could run out on a busy machine)."""
    replicas = [_service(models_dir, s, executor, max_attempts=32) for s in two_stores]
    await replicas[0].create("stacked", "shared")
    x = np.array([0.4, -0.1, 0.7], np.float32)
    results = await asyncio.gather(*(replicas[i % 2].step("shared", x) for i in range(40)))
    assert sorted(r.step for r in results) == list(range(1, 41))  # none lost, none applied twice
    _, states = tiny_models["stacked"].reference(np.tile(x, (1, 40, 1)))
    final = replicas[1].states_of(await replicas[1].get("shared"))
    for key in states:
        np.testing.assert_allclose(final[key], states[key][0], atol=ATOL)
    conflicts = sum(r.parts.metrics.cas_conflicts._value.get() for r in replicas)  # type: ignore[union-attr]
    assert conflicts > 0  # the race really happened and was resolved by re-reading


async def test_sequence_start_takes_over_the_id_and_later_steps_check_the_model(
    models_dir: Path, tiny_models: dict[str, Any], executor: ThreadPoolExecutor
) -> None:
    """A v2 start replaces a session another model holds under the id; a plain step refuses it."""
    store = MemorySessionStore(60, 10)
    service = _service(models_dir, store, executor)
    x = np.array([[0.4, -0.1, 0.7]], np.float32)
    await service.create("simple", "v2:stacked:1")
    with pytest.raises(SequenceNotStarted):
        await sequences.step(service, "stacked", "v2:stacked:1", x, start=False, end=False)
    result = await sequences.step(service, "stacked", "v2:stacked:1", x, start=True, end=False)
    assert (result.record.model, result.step) == ("stacked", 1)
    expected, _ = tiny_models["stacked"].reference(x[None])
    np.testing.assert_allclose(result.outputs["outputs"], expected[0][0], atol=ATOL)
    await sequences.step(service, "stacked", "v2:stacked:1", x, start=False, end=True)
    with pytest.raises(SessionNotFound):
        await service.get("v2:stacked:1")


class _CountingReads(RedisSessionStore):
    """The real Redis store, counting the session reads the service asks it for."""

    reads = 0

    async def get(self, session_id: str) -> Any:
        self.reads += 1
        return await super().get(session_id)


async def test_a_later_sequence_request_reads_its_session_once(
    models_dir: Path, redis_url: str, executor: ThreadPoolExecutor
) -> None:
    """On Redis a read is a round trip: the step's own read checks the sequence's model."""
    store = _CountingReads(redis_url, 60, 10)
    service = _service(models_dir, store, executor)
    x = np.array([[0.4, -0.1, 0.7]], np.float32)
    await sequences.step(service, "stacked", "v2:stacked:7", x, start=True, end=False)
    store.reads = 0
    result = await sequences.step(service, "stacked", "v2:stacked:7", x, start=False, end=False)
    assert (result.step, store.reads) == (2, 1)
    await service.create("simple", "v2:stacked:8")  # another model's session under the id
    with pytest.raises(SequenceNotStarted):
        await sequences.step(service, "stacked", "v2:stacked:8", x, start=False, end=False)
    await store.close()


async def test_replicas_starting_one_sequence_at_once_both_succeed(
    models_dir: Path,
    tiny_models: dict[str, Any],
    two_stores: list[RedisSessionStore],
    executor: ThreadPoolExecutor,
) -> None:
    replicas = [_service(models_dir, s, executor) for s in two_stores]
    x = np.array([[0.4, -0.1, 0.7]], np.float32)
    results = await asyncio.gather(
        *(
            sequences.step(replicas[i % 2], "stacked", "v2:stacked:7", x, start=True, end=False)
            for i in range(6)
        )
    )
    assert all(r.record.model == "stacked" for r in results)  # each start restarted or created
    assert (await replicas[0].get("v2:stacked:7")).step >= 1


# -- exactly-once steps -------------------------------------------------------------------------
def _store(store_url: str) -> Any:
    if store_url == "memory":
        return MemorySessionStore(60, 10)
    return RedisSessionStore(store_url, 60, 10)


def _count(service: SessionService, name: str) -> float:
    return float(getattr(service.parts.metrics, name)._value.get())  # type: ignore[union-attr]


async def test_numbered_steps_apply_once_and_a_resend_gets_the_same_reply(
    models_dir: Path,
    tiny_models: dict[str, Any],
    store_url: str,
    executor: ThreadPoolExecutor,
    rng: np.random.Generator,
) -> None:
    store = _store(store_url)
    service = _service(models_dir, store, executor)
    await service.create("stacked", "once")
    x = rng.normal(size=(4, 3)).astype(np.float32)
    batcher, submitted = service.parts.batchers["stacked"], []
    submit = batcher.submit

    async def counted(inputs: np.ndarray, mask: np.ndarray | None, state: np.ndarray) -> StepOutput:
        submitted.append((inputs, mask, state))
        return await submit(inputs, mask, state)

    batcher.submit = counted  # type: ignore[method-assign]
    first = await service.step("once", x[0], step_number=0)
    assert first.step == 1 and len(submitted) == 1
    # a resend: nothing is recomputed, the kept reply returns
    again = await service.step("once", x[0].copy(), step_number=0)
    assert again.step == 1 and len(submitted) == 1
    assert again.outputs["outputs"].tobytes() == first.outputs["outputs"].tobytes()
    assert _count(service, "step_replays") == 1
    # other inputs, a mask or another layout under the same number: refused, not replayed
    for inputs, mask in ((x[3], None), (x[0], np.array([False])), (x[0][None], None)):
        with pytest.raises(StepMismatch, match="step=0 with other inputs") as refused:
            await service.step("once", inputs, mask, step_number=0)
        assert refused.value.current_step == 1 and refused.value.field == "step"
    assert len(submitted) == 1 and _count(service, "step_replays") == 1
    second = await service.step("once", x[1], step_number=1)
    assert second.step == 2
    for sent, why in ((0, "behind"), (5, "ahead")):
        with pytest.raises(StepOutOfOrder, match=why) as out_of_order:
            await service.step("once", x[2], step_number=sent)
        assert out_of_order.value.current_step == 2 and out_of_order.value.field == "step"
    third = await service.step("once", x[2], step_number=2)
    expected, states = tiny_models["stacked"].reference(x[None, :3])
    got = [first.outputs["outputs"], second.outputs["outputs"], third.outputs["outputs"]]
    np.testing.assert_allclose(np.stack(got), expected[0][0], atol=ATOL)
    record = await service.get("once")
    assert (record.step, record.revision) == (3, 3)
    for key, value in service.states_of(record).items():
        np.testing.assert_allclose(value, states[key][0], atol=ATOL)
    await store.close()


async def test_a_step_without_a_number_or_a_reset_keeps_no_result(
    models_dir: Path, tiny_models: dict[str, Any], store_url: str, executor: ThreadPoolExecutor
) -> None:
    store = _store(store_url)
    service = _service(models_dir, store, executor)
    await service.create("stacked", "mixed")
    x = np.array([0.4, -0.1, 0.7], np.float32)
    await service.step("mixed", x, step_number=0)
    assert (await service.get("mixed")).last_result is not None
    await service.step("mixed", x)  # at-least-once: applied, nothing kept
    record = await service.get("mixed")
    assert record.step == 2 and record.last_result is None
    with pytest.raises(StepOutOfOrder, match="carried no step number"):
        await service.step("mixed", x, step_number=1)
    assert (await service.step("mixed", x, step_number=2)).step == 3
    await service.reset("mixed")  # counters restart, the kept result goes
    record = await service.get("mixed")
    assert (record.step, record.last_result) == (0, None)
    with pytest.raises(StepOutOfOrder) as refused:
        await service.step("mixed", x, step_number=2)
    assert refused.value.current_step == 0
    assert (await service.step("mixed", x, step_number=0)).step == 1
    await store.close()


async def test_duplicates_sent_at_once_apply_once(
    models_dir: Path, tiny_models: dict[str, Any], store_url: str, executor: ThreadPoolExecutor
) -> None:
    """The per-session lock queues the duplicate behind the original: it gets the kept reply."""
    store = _store(store_url)
    service = _service(models_dir, store, executor)
    await service.create("stacked", "twice")
    x = np.array([[0.4, -0.1, 0.7], [0.2, 0.3, -0.5]], np.float32)
    results = await asyncio.gather(*(service.step("twice", x, step_number=0) for _ in range(3)))
    assert {r.step for r in results} == {1}
    assert len({r.outputs["outputs"].tobytes() for r in results}) == 1
    assert _count(service, "step_replays") == 2
    assert (await service.get("twice")).timesteps == 2
    await store.close()


async def test_a_replica_that_loses_the_race_re_checks_the_step_number(
    models_dir: Path,
    tiny_models: dict[str, Any],
    two_stores: list[RedisSessionStore],
    executor: ThreadPoolExecutor,
) -> None:
    """Two replicas apply the same numbered step at once: one writes, the other re-reads the
    record, finds its step applied, and answers with the winner's outputs."""
    replicas = [_service(models_dir, s, executor) for s in two_stores]
    await replicas[0].create("stacked", "raced")
    rng = np.random.default_rng(11)
    x = rng.normal(size=(12, 3)).astype(np.float32)
    outputs = []
    for i in range(12):
        a, b = await asyncio.gather(*(r.step("raced", x[i], step_number=i) for r in replicas))
        assert a.step == b.step == i + 1
        assert a.outputs["outputs"].tobytes() == b.outputs["outputs"].tobytes()
        outputs.append(a.outputs["outputs"])
    assert sum(_count(r, "cas_conflicts") for r in replicas) > 0  # the race happened
    assert sum(_count(r, "step_replays") for r in replicas) == 12  # and every loser replayed
    expected, states = tiny_models["stacked"].reference(x[None])
    np.testing.assert_allclose(np.stack(outputs), expected[0][0], atol=ATOL)
    record = await replicas[0].get("raced")
    assert (record.step, record.timesteps) == (12, 12)
    for key, value in replicas[0].states_of(record).items():
        np.testing.assert_allclose(value, states[key][0], atol=ATOL)


async def test_sequence_steps_take_numbers_and_a_start_is_step_zero(
    models_dir: Path, tiny_models: dict[str, Any], executor: ThreadPoolExecutor
) -> None:
    service = _service(models_dir, MemorySessionStore(60, 10), executor)
    x = np.array([[0.4, -0.1, 0.7]], np.float32)
    with pytest.raises(InvalidInput, match="step 0"):
        await sequences.step(service, "stacked", "v2:stacked:9", x, start=True, end=False,
                                    step_number=3)  # fmt: skip
    first = await sequences.step(
        service, "stacked", "v2:stacked:9", x, start=True, end=False, step_number=0
    )
    again = await sequences.step(
        service,  # a resent start starts over: the same reply
        "stacked",
        "v2:stacked:9",
        x,
        start=True,
        end=False,
        step_number=0,
    )
    assert first.step == again.step == 1
    assert first.outputs["outputs"].tobytes() == again.outputs["outputs"].tobytes()
    step = await sequences.step(
        service, "stacked", "v2:stacked:9", x, start=False, end=False, step_number=1
    )
    with pytest.raises(StepMismatch):
        await sequences.step(
            service, "stacked", "v2:stacked:9", 2 * x, start=False, end=False, step_number=1
        )
    replay = await sequences.step(
        service, "stacked", "v2:stacked:9", x, start=False, end=False, step_number=1
    )
    assert step.step == replay.step == 2
    assert step.outputs["outputs"].tobytes() == replay.outputs["outputs"].tobytes()
    with pytest.raises(StepOutOfOrder):
        await sequences.step(
            service, "stacked", "v2:stacked:9", x, start=False, end=False, step_number=0
        )


# -- tenants ------------------------------------------------------------------------------------
@pytest.fixture(params=["memory", "redis", "cluster"])
def tenant_store_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory"
    return str(request.getfixturevalue(f"{request.param}_url"))


async def test_two_tenants_same_id_are_two_sessions_on_every_store(
    models_dir: Path,
    tiny_models: dict[str, Any],
    tenant_store_url: str,
    executor: ThreadPoolExecutor,
    rng: np.random.Generator,
) -> None:
    """Per-step and bulk paths, numbered steps and listings keep tenants apart; the store
    holds a named tenant's session under a key no client id can be."""
    store = _store(tenant_store_url)
    service = _service(models_dir, store, executor)
    acme, zeta, root = Caller("acme"), Caller("zeta"), Caller("root", admin=True)
    x = rng.normal(size=(2, 3)).astype(np.float32)
    for caller in (acme, zeta, ANYONE):
        made = await service.create("stacked", "station-7", None, caller)
        assert made.session_id == caller.key("station-7") and made.owner == caller.name
    a = await service.step("station-7", x, None, 0, acme)
    z = await service.step("station-7", x + 1, None, 0, zeta)
    assert (a.step, z.step) == (1, 1)
    assert not np.allclose(a.outputs["outputs"], z.outputs["outputs"])
    # bulk: both tenants' "station-7" in one batch each, numbered
    [again] = await step_all(service, "stacked", [BulkStep("station-7", x, None, 1)], acme)
    assert isinstance(again, StepResult) and again.step == 2
    [resent] = await step_all(service, "stacked", [BulkStep("station-7", x + 1, None, 0)], zeta)
    assert isinstance(resent, StepResult) and resent.step == 1  # zeta's kept step 0
    np.testing.assert_allclose(resent.outputs["outputs"], z.outputs["outputs"], atol=ATOL)
    assert (await service.get("station-7", ANYONE)).step == 0  # the unnamed tenant's
    assert (await service.get("acme~station-7", root)).step == 2
    with pytest.raises(SessionNotFound, match="'station-7'"):  # never the store key
        await service.get("station-7", Caller("beta"))
    assert [s.session_id for s in (await service.page(caller=acme)).sessions] == ["station-7"]
    listed = await service.page(caller=root)
    assert [(s.session_id, s.owner) for s in listed.sessions] == [
        ("~station-7", ""), ("acme~station-7", "acme"), ("zeta~station-7", "zeta")
    ]  # fmt: skip
    assert await store.count() == 3
    if tenant_store_url != "memory":  # the key layout: the scoped id inside the usual key
        import redis
        from redis.cluster import RedisCluster

        if tenant_store_url.startswith("redis+cluster://"):
            host, port = tenant_store_url.removeprefix("redis+cluster://").split(",")[0].split(":")
            client: Any = RedisCluster(host=host, port=int(port))
            keys = {k.decode() for k in client.scan_iter(match="*session:*", target_nodes="all")}
        else:
            client = redis.Redis.from_url(tenant_store_url)
            keys = {k.decode() for k in client.scan_iter(match="*session:*")}
        client.close()
        assert {k.rsplit(":", 1)[-1] for k in keys if "station-7" in k} == {
            "station-7", "~acme~station-7", "~zeta~station-7"
        }  # fmt: skip
    await service.delete("station-7", zeta)
    with pytest.raises(SessionNotFound):
        await service.get("station-7", zeta)
    assert (await service.get("station-7", acme)).step == 2
    await store.close()


async def test_a_snapshot_keeps_each_tenants_sessions_its_own(
    models_dir: Path, tiny_models: dict[str, Any], executor: ThreadPoolExecutor, tmp_path: Path
) -> None:
    """Scoped keys go through a snapshot and a restart's restore (only ids a store may hold)."""
    before = _service(models_dir, MemorySessionStore(60, 10), executor)
    acme, zeta = Caller("acme"), Caller("zeta")
    for caller in (acme, zeta, ANYONE):
        await before.create("stacked", "s", None, caller)
    await before.step("s", np.array([0.4, -0.1, 0.7], np.float32), caller=acme)
    snapshot.write(tmp_path / "snap", before.store.records())  # type: ignore[attr-defined]
    records = snapshot.read(tmp_path / "snap")
    bogus = dataclasses.replace(records[0], session_id="~~acme~s")  # no client id maps here
    after = _service(models_dir, MemorySessionStore(60, 10), executor)
    assert [after.servable(r) for r in [*records, bogus]] == [True, True, True, False]
    after.store.restore(records)  # type: ignore[attr-defined]
    assert [(await after.get("s", c)).step for c in (acme, zeta, ANYONE)] == [1, 0, 0]
