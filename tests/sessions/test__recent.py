"""Kept records (``GRUSERVE_STORE_RECENT_RECORDS``): a replica's next step on a session it
wrote last skips the read, and never answers from a record that went stale meanwhile."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from gruserve.errors import SessionNotFound
from gruserve.metrics import Metrics
from gruserve.runtime.batcher import Batcher
from gruserve.runtime.registry import ModelRegistry
from gruserve.sessions.bulk import BulkStep, PlainBlock, step_bulk
from gruserve.sessions.redis_store import RedisSessionStore
from gruserve.sessions.redis_store._recent import RecentRecords
from gruserve.sessions.service import SessionService
from gruserve.sessions.store import SessionRecord

ATOL = 1e-5


class _Counting(RedisSessionStore):
    """The real Redis store, counting the session reads the service asks it for (a bulk's
    ``get_many`` counts each id)."""

    reads = 0

    async def get(self, session_id: str) -> Any:
        self.reads += 1
        return await super().get(session_id)

    async def get_many(self, session_ids: Any) -> Any:
        self.reads += len(session_ids)
        return await super().get_many(session_ids)


class _NoWriterCheck(RedisSessionStore):
    """A store whose writes drop the writer check: what revision alone would decide."""

    async def compare_and_set(
        self, record: SessionRecord, expected_revision: int, end: bool = False, base: str = ""
    ) -> bool:
        return await super().compare_and_set(record, expected_revision, end)


@pytest.fixture(params=["redis", "packed-redis", "cluster", "packed-cluster"])
def layout(request: pytest.FixtureRequest) -> tuple[str, bool]:
    """A Redis URL (one Redis or a cluster) and whether its stores write packed records."""
    name = str(request.param)
    url = str(request.getfixturevalue(f"{name.removeprefix('packed-')}_url"))
    return url, name.startswith("packed-")


@pytest.fixture
def executor() -> Any:
    with ThreadPoolExecutor(2) as pool:
        yield pool


@pytest.fixture
async def stores(layout: tuple[str, bool]) -> AsyncIterator[list[_Counting]]:
    """Two replicas' stores on one Redis (or cluster), each keeping up to 100 records."""
    url, packed = layout
    made = [_Counting(url, 60, 50, packed=packed, recent=100) for _ in range(2)]
    yield made
    for store in made:
        await store.close()


def _service(models_dir: Path, store: Any, executor: ThreadPoolExecutor) -> SessionService:
    registry = ModelRegistry.load(models_dir, ["CPUExecutionProvider"])
    model = registry.get("stacked")
    batchers = {"stacked": Batcher(model, executor, max_batch_size=8, max_delay_s=0.001)}
    return SessionService(
        registry, batchers, store, max_timesteps=100, metrics=Metrics(CollectorRegistry())
    )


def _count(service: SessionService, name: str) -> float:
    return float(getattr(service.parts.metrics, name)._value.get())  # type: ignore[union-attr]


def _reference(tiny_models: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """The outputs of steps of one timestep each, ``x`` (steps, features), in one run."""
    expected, _ = tiny_models["stacked"].reference(x[None])
    return np.asarray(expected[0][0])


async def test_one_replica_reads_only_once(
    models_dir: Path,
    tiny_models: dict[str, Any],
    stores: list[_Counting],
    executor: ThreadPoolExecutor,
) -> None:
    """Steps of a session this replica created and stepped read nothing; the same steps on
    a store that keeps nothing read once each (so the count can tell)."""
    store = stores[0]
    service = _service(models_dir, store, executor)
    x = np.random.default_rng(3).normal(size=(8, 3)).astype(np.float32)
    await service.create("stacked", "alone")
    outputs = [(await service.step("alone", x[i])).outputs["outputs"] for i in range(8)]
    assert store.reads == 0
    assert (_count(service, "recent_misses"), _count(service, "cas_conflicts")) == (0, 0)
    np.testing.assert_allclose(np.stack(outputs), _reference(tiny_models, x), atol=ATOL)

    url, packed = stores[0].url, stores[0]._packed
    plain = _Counting(url, 60, 50, packed=packed, recent=0)
    try:
        reading = _service(models_dir, plain, executor)
        await reading.create("stacked", "reads")
        for i in range(8):
            await reading.step("reads", x[i])
        assert plain.reads == 8
    finally:
        await plain.close()


async def test_two_replicas_alternating_equal_the_sequential_run(
    models_dir: Path,
    tiny_models: dict[str, Any],
    stores: list[_Counting],
    executor: ThreadPoolExecutor,
) -> None:
    """Each replica's kept record is stale on its every turn: it re-reads (a miss, not a
    conflict) and the session still advances exactly as one process would advance it."""
    replicas = [_service(models_dir, s, executor) for s in stores]
    x = np.random.default_rng(5).normal(size=(10, 3)).astype(np.float32)
    await replicas[0].create("stacked", "alternating")
    outputs = []
    for i in range(10):
        result = await replicas[i % 2].step("alternating", x[i], step_number=i)
        assert result.step == i + 1
        outputs.append(result.outputs["outputs"])
    np.testing.assert_allclose(np.stack(outputs), _reference(tiny_models, x), atol=ATOL)
    # replica 0 created it, so its first step went on from its kept record; every later
    # turn of either replica found the other had written since
    assert [_count(r, "recent_misses") for r in replicas] == [4, 4]
    assert sum(_count(r, "cas_conflicts") for r in replicas) == 0
    assert sum(s.reads for s in stores) == 9


async def test_unnumbered_steps_that_hop_stop_being_kept_until_they_stay(
    models_dir: Path,
    tiny_models: dict[str, Any],
    stores: list[_Counting],
    executor: ThreadPoolExecutor,
) -> None:
    """An unnumbered step finds its kept record stale only at the compare-and-set, after its
    run. Each replica pays that once; while the other replica writes the session between
    its turns it keeps nothing of it (its steps read, as with no kept records), and once its
    own writes follow each other it keeps the session again."""
    replicas = [_service(models_dir, s, executor) for s in stores]
    x = np.random.default_rng(8).normal(size=(14, 3)).astype(np.float32)
    await replicas[0].create("stacked", "hops")
    outputs = []
    for i in range(10):
        outputs.append((await replicas[i % 2].step("hops", x[i])).outputs["outputs"])
    assert [_count(r, "recent_misses") for r in replicas] == [1, 1]
    assert sum(s.reads for s in stores) == 9  # every step but replica 0's first
    before = stores[0].reads
    for i in range(10, 14):  # the session stays on replica 0
        outputs.append((await replicas[0].step("hops", x[i])).outputs["outputs"])
    assert stores[0].reads - before == 2  # two reads, then its write follows its own again
    assert [_count(r, "recent_misses") for r in replicas] == [1, 1]
    assert sum(_count(r, "cas_conflicts") for r in replicas) == 0
    np.testing.assert_allclose(np.stack(outputs), _reference(tiny_models, x), atol=ATOL)


async def test_a_session_deleted_and_made_again_at_the_same_revision_is_not_mistaken(
    models_dir: Path,
    tiny_models: dict[str, Any],
    stores: list[_Counting],
    executor: ThreadPoolExecutor,
) -> None:
    """ABA: replica B deletes the session A keeps, creates it again and steps it to A's
    kept revision. A's next step must go on from B's state, not from its own: the write
    checks the writer token, not the revision alone (without it, A's stale record wins)."""
    a, b = (_service(models_dir, s, executor) for s in stores)
    x = np.random.default_rng(7).normal(size=(3, 3)).astype(np.float32)
    await a.create("stacked", "aba")
    kept = await a.step("aba", x[0])
    await b.delete("aba")
    await b.create("stacked", "aba")
    again = await b.step("aba", x[1])
    assert again.record.revision == kept.record.revision  # the same revision, another record

    result = await a.step("aba", x[2])
    np.testing.assert_allclose(
        np.stack([again.outputs["outputs"], result.outputs["outputs"]]),
        _reference(tiny_models, x[1:]),
        atol=ATOL,
    )
    assert (result.step, _count(a, "recent_misses")) == (2, 1)

    # the same story on a store without the check ends on A's stale state: what it guards
    url, packed = stores[0].url, stores[0]._packed
    unchecked = _NoWriterCheck(url, 60, 50, packed=packed, recent=100)
    try:
        c = _service(models_dir, unchecked, executor)
        await c.create("stacked", "aba2")
        await c.step("aba2", x[0])
        await b.delete("aba2")
        await b.create("stacked", "aba2")
        await b.step("aba2", x[1])
        stale = await c.step("aba2", x[2])
        np.testing.assert_allclose(
            stale.outputs["outputs"], _reference(tiny_models, x[[0, 2]])[1], atol=ATOL
        )
    finally:
        await unchecked.close()


async def test_numbers_and_resends_are_decided_on_the_stored_record(
    models_dir: Path,
    tiny_models: dict[str, Any],
    stores: list[_Counting],
    executor: ThreadPoolExecutor,
) -> None:
    """A keeps the session at step 5; B applies numbered steps 5 and 6. A resend of step 6
    to A gets B's kept result, and step 7 sent to A is applied (neither is refused on A's
    stale record), then step 8 to A goes on from A's own write again."""
    a, b = (_service(models_dir, s, executor) for s in stores)
    x = np.random.default_rng(9).normal(size=(9, 3)).astype(np.float32)
    await a.create("stacked", "numbered")
    for i in range(5):
        await a.step("numbered", x[i], step_number=i)
    fifth = await b.step("numbered", x[5], step_number=5)
    sixth = await b.step("numbered", x[6], step_number=6)
    assert fifth.step == 6

    resent = await a.step("numbered", x[6], step_number=6)
    assert resent.step == 7
    assert resent.outputs["outputs"].tobytes() == sixth.outputs["outputs"].tobytes()
    assert _count(a, "step_replays") == 1

    seventh = await a.step("numbered", x[7], step_number=7)
    stores[0].reads = 0
    eighth = await a.step("numbered", x[8], step_number=8)
    assert (seventh.step, eighth.step, stores[0].reads) == (8, 9, 0)
    reference = _reference(tiny_models, x)
    np.testing.assert_allclose(seventh.outputs["outputs"], reference[7], atol=ATOL)
    np.testing.assert_allclose(eighth.outputs["outputs"], reference[8], atol=ATOL)
    assert _count(a, "cas_conflicts") == 0


async def test_the_kept_token_is_the_stored_writer_and_dead_sessions_are_dropped(
    stores: list[_Counting],
) -> None:
    """The token kept with a record is the ``writer`` its write stored (what the check
    compares); a delete or an ending write keeps nothing."""
    store = stores[0]
    now = time.time()
    record = SessionRecord("tok", "m", 1, np.arange(4, dtype=np.float32), 0, 0, 0, now, now)
    await store.create(record)
    kept = store.recent("tok")
    assert kept is not None and store.recent("tok") is None  # taken once
    stored = await store._redis.hget(store._key("tok"), "writer")  # type: ignore[misc]
    assert isinstance(stored, bytes) and stored.decode() == kept.writer
    assert kept.record.state.dtype == np.float32

    advanced = kept.record.advanced(kept.record.state + 1, 1, now)
    assert await store.compare_and_set(advanced, 0, base=kept.writer)
    assert store.recent("tok") is not None
    assert await store.compare_and_set(advanced.advanced(advanced.state, 1, now), 1)
    await store.delete("tok")
    assert store.recent("tok") is None
    await store.create(record)
    assert await store.compare_and_set(record.advanced(record.state, 1, now), 0, end=True)
    assert store.recent("tok") is None
    with pytest.raises(SessionNotFound):
        await store.get("tok")


def test_recent_records_are_bounded_and_taken_once() -> None:
    now = time.time()
    base = np.arange(6, dtype=np.float64).reshape(2, 3)
    recent = RecentRecords(2)
    for n, sid in enumerate(("a", "b", "c")):
        record = SessionRecord(sid, "m", 1, base[n % 2], 0, 0, n, now, now, history=b"h")
        recent.keep(record, "w", n - 1)
    assert len(recent) == 2 and recent.take("a") is None  # the least recently written went
    kept = recent.take("c")
    assert kept is not None and recent.take("c") is None
    # a row of a batch's float64 output is kept as a float32 array of its own, and no
    # history while the store keeps none
    assert kept.record.state.dtype == np.float32 and kept.record.state.base is None
    assert kept.record.history is None
    recent.drop("b")
    assert len(recent) == 0
    off = RecentRecords(0)
    off.keep(SessionRecord("a", "m", 1, base[0], 0, 0, 0, now, now), "w", -1)
    off.stray("a")
    assert len(off) == 0
    with pytest.raises(ValueError, match="limit >= 0"):
        RecentRecords(-1)


async def _bulk(service: SessionService, ids: list[str], x: np.ndarray) -> list[np.ndarray]:
    """One bulk request of plain steps, ``x[r]`` (T, F) to ``ids[r]``; each step's outputs
    (from the array path's answer, or the step's own outcome where it was left)."""
    block = PlainBlock(list(range(len(ids))), ids, x)
    outcomes, answer = await step_bulk(service, "stacked", [None] * len(ids), block=block)
    assert answer is not None
    got = []
    for row, outcome in enumerate(outcomes):
        if outcome is None:
            got.append(answer.outputs[0][answer.slot[row]])
        else:
            assert not isinstance(outcome, BaseException), outcome
            got.append(outcome.outputs["outputs"])  # type: ignore[union-attr]
    return got


async def test_a_second_bulk_on_the_same_sessions_reads_nothing(
    models_dir: Path,
    tiny_models: dict[str, Any],
    stores: list[_Counting],
    executor: ThreadPoolExecutor,
) -> None:
    """Bulk steps of sessions this replica wrote last go on from its kept records: the
    second and third bulks read no session, and every session advances as one run."""
    service, store = _service(models_dir, stores[0], executor), stores[0]
    ids = [f"bulk{n}" for n in range(6)]
    for session_id in ids:
        await service.create("stacked", session_id)
    x = np.random.default_rng(11).normal(size=(3, 6, 2, 3)).astype(np.float32)
    got = [await _bulk(service, ids, x[n]) for n in range(3)]
    assert store.reads == 0
    assert (_count(service, "recent_misses"), _count(service, "cas_conflicts")) == (0, 0)
    for r, session_id in enumerate(ids):
        want = _reference(tiny_models, x[:, r].reshape(6, 3))
        np.testing.assert_allclose(np.concatenate([got[n][r] for n in range(3)]), want, atol=ATOL)
        assert (await service.get(session_id)).step == 3


async def test_a_bulk_after_another_replica_stepped_some_sessions(
    models_dir: Path,
    tiny_models: dict[str, Any],
    stores: list[_Counting],
    executor: ThreadPoolExecutor,
) -> None:
    """Replica B steps half of the sessions A keeps: A's next bulk finds those kept records
    stale (misses, read afresh, not conflicts) and every session equals the sequential
    run of its steps; the rest go on from A's kept records without a read."""
    a, b = (_service(models_dir, s, executor) for s in stores)
    ids = [f"mixed{n}" for n in range(6)]
    for session_id in ids:
        await a.create("stacked", session_id)
    x = np.random.default_rng(13).normal(size=(3, 6, 1, 3)).astype(np.float32)
    first = await _bulk(a, ids, x[0])
    between = [(await b.step(ids[r], x[1, r])).outputs["outputs"] for r in (0, 2, 4)]
    last = await _bulk(a, ids, x[2])
    assert (_count(a, "recent_misses"), stores[0].reads) == (3, 3)
    assert sum(_count(r, "cas_conflicts") for r in (a, b)) == 0
    for r, session_id in enumerate(ids):
        steps = [0, 1, 2] if r % 2 == 0 else [0, 2]
        got = [first[r], *([between[r // 2]] if r % 2 == 0 else []), last[r]]
        want = _reference(tiny_models, x[steps, r, 0])
        np.testing.assert_allclose(np.concatenate(got), want, atol=ATOL)
        assert (await a.get(session_id)).step == len(steps)


async def test_a_bulk_on_a_session_deleted_and_made_again_at_the_same_revision(
    models_dir: Path,
    tiny_models: dict[str, Any],
    stores: list[_Counting],
    executor: ThreadPoolExecutor,
) -> None:
    """ABA in a bulk: B deletes a session A keeps, creates it again and steps it to A's
    kept revision. A's bulk goes on from B's state for it (the writer token refuses A's
    kept base) and from its kept records for the others."""
    a, b = (_service(models_dir, s, executor) for s in stores)
    ids = ["aba-bulk0", "aba-bulk1", "aba-bulk2"]
    for session_id in ids:
        await a.create("stacked", session_id)
    x = np.random.default_rng(17).normal(size=(3, 3, 1, 3)).astype(np.float32)
    first = await _bulk(a, ids, x[0])
    kept_revision = (await a.get(ids[1])).revision
    await b.delete(ids[1])
    await b.create("stacked", ids[1])
    again = await b.step(ids[1], x[1, 1])
    assert again.record.revision == kept_revision  # the same revision, another record
    stores[0].reads = 0
    last = await _bulk(a, ids, x[2])
    assert (_count(a, "recent_misses"), stores[0].reads) == (1, 1)
    np.testing.assert_allclose(
        np.concatenate([again.outputs["outputs"], last[1]]),
        _reference(tiny_models, x[1:, 1, 0]),
        atol=ATOL,
    )
    for r in (0, 2):
        want = _reference(tiny_models, x[[0, 2], r, 0])
        np.testing.assert_allclose(np.concatenate([first[r], last[r]]), want, atol=ATOL)
    assert [(await a.get(session_id)).step for session_id in ids] == [2, 2, 2]


async def test_a_numbered_bulk_goes_on_from_kept_records_and_reads_the_stale_ones(
    models_dir: Path,
    tiny_models: dict[str, Any],
    stores: list[_Counting],
    executor: ThreadPoolExecutor,
) -> None:
    """The batch path (numbered steps) too: A's second numbered bulk reads only the
    sessions B stepped meanwhile (misses, not conflicts), and every session equals the
    sequential run of its steps."""
    a, b = (_service(models_dir, s, executor) for s in stores)
    ids = [f"numbered{n}" for n in range(4)]
    for session_id in ids:
        await a.create("stacked", session_id)
    x = np.random.default_rng(19).normal(size=(3, 4, 3)).astype(np.float32)

    async def bulk(n: int, numbers: list[int]) -> list[np.ndarray]:
        steps = [BulkStep(s, x[n, r], None, numbers[r]) for r, s in enumerate(ids)]
        outcomes, _ = await step_bulk(a, "stacked", steps)
        assert all(o is not None and not isinstance(o, BaseException) for o in outcomes)
        return [o.outputs["outputs"] for o in outcomes]  # type: ignore[union-attr]

    first = await bulk(0, [0, 0, 0, 0])
    assert stores[0].reads == 0
    between = [(await b.step(ids[r], x[1, r], step_number=1)).outputs["outputs"] for r in (0, 1)]
    last = await bulk(2, [2, 2, 1, 1])
    assert (_count(a, "recent_misses"), stores[0].reads) == (2, 2)
    assert sum(_count(r, "cas_conflicts") for r in (a, b)) == 0
    for r, session_id in enumerate(ids):
        steps = [0, 1, 2] if r < 2 else [0, 2]
        got = [first[r], *([between[r]] if r < 2 else []), last[r]]
        want = _reference(tiny_models, x[steps, r])
        np.testing.assert_allclose(np.stack(got), want, atol=ATOL)
        assert (await a.get(session_id)).step == len(steps)
