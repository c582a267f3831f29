"""``step_all``: the batch path against single steps, on both stores, and its edge cases.

The session service is the production one (built by the app factory, real stores, a real
Redis). Reference results are the same steps sent one at a time through
``SessionService.step`` on sessions of their own; the model's numbers themselves are
checked against torch in tests/api/test_bulk.py. Where a test needs to see which path a
step took or to put a second writer between a read and a write, it wraps a method of the
service or store around the real one.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import (
    all_instances,
    cancel_while_waiting_on,
    new_sessions,
    outputs_of,
    serve,
    until,
)
from gruserve.errors import (
    InvalidInput,
    SessionNotFound,
    SessionNotOnModel,
    StepMismatch,
    StepOutOfOrder,
)
from gruserve.sessions.bulk import BulkStep, step_all
from gruserve.sessions.owner import Caller, client_id
from gruserve.sessions.redis_store import RedisSessionStore
from gruserve.sessions.service import SessionService, StepResult

X = np.zeros((1, 3), np.float32)
ATOL = 1e-6


async def test_batch_path_equals_single_steps(
    either: SessionService, rng: np.random.Generator
) -> None:
    """Steps of every shape the API takes (one timestep with and without a time axis,
    several, float64 values, a mask, numbered and not), a session named three times,
    applied in bulk give the outputs, step counts and states that the same steps sent one
    at a time give, on both stores."""
    bulk_ids, single_ids = await new_sessions(either, 6), await new_sessions(either, 6)
    x = rng.normal(size=(8, 4, 3))
    mask = np.array([True, False, True, True])
    shapes: list[tuple[int, np.ndarray, np.ndarray | None, int | None]] = [
        (0, x[0, :1].astype(np.float32), None, None),
        (1, x[1, 0].astype(np.float32), None, None),  # no time axis
        (2, x[2, :3].astype(np.float32), None, 0),  # numbered
        (0, x[3, :2].astype(np.float32), None, None),  # the same session again
        (3, x[4], None, None),  # float64, as JSON decodes it
        (4, x[5].astype(np.float32), mask, None),
        (0, x[6, :1].astype(np.float32), None, None),  # and a third time
        (5, x[7, 0], None, 0),  # float64, no time axis, numbered
    ]
    items: list[BulkStep | BaseException] = [
        BulkStep(bulk_ids[s], inputs, m, n) for s, inputs, m, n in shapes
    ]
    outcomes = await step_all(either, "stacked", items)
    for (s, inputs, m, n), outcome in zip(shapes, outcomes, strict=True):
        single = await either.step(single_ids[s], inputs, m, n)
        assert outcome.step == single.step  # type: ignore[union-attr]
        for g, w in zip(outputs_of(outcome), outputs_of(single), strict=True):
            assert g.shape == w.shape
            np.testing.assert_allclose(g, w, atol=ATOL)
    assert [o.step for o in outcomes] == [1, 1, 1, 2, 1, 1, 3, 1]  # type: ignore[union-attr]
    for bulk_id, single_id in zip(bulk_ids, single_ids, strict=True):
        got, want = await either.get(bulk_id), await either.get(single_id)
        assert (got.step, got.timesteps, got.revision) == (want.step, want.timesteps, want.revision)
        np.testing.assert_allclose(got.state, want.state, atol=ATOL)


async def test_later_steps_of_a_session_follow_in_order_through_the_single_path(
    sessions: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first step of each session goes through the batch path; the later ones go
    through ``SessionService.step``, in request order, after it; errors stay in place."""
    a = (await sessions.create("simple")).session_id
    b = (await sessions.create("simple")).session_id
    calls: list[tuple[str, float]] = []
    real = sessions.step

    async def step(session_id: str, inputs: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        calls.append((session_id, float(inputs[0, 0])))
        await asyncio.sleep(0)  # let the other sessions' steps interleave
        return await real(session_id, inputs, *args, **kwargs)

    monkeypatch.setattr(sessions, "step", step)
    bad = InvalidInput("steps[3].inputs", "not numbers")
    items: list[BulkStep | BaseException] = [
        BulkStep(a, X + 1),
        BulkStep(b, X + 2),
        BulkStep(a, X + 3),
        bad,
        BulkStep("nobody", X),
        BulkStep(a, X + 5),
    ]
    outcomes = await step_all(sessions, "simple", items)
    assert [o.step for o in outcomes if not isinstance(o, BaseException)] == [1, 1, 2, 3]
    assert outcomes[3] is bad and isinstance(outcomes[4], SessionNotFound)
    assert calls == [(a, 3.0), (a, 5.0)]


async def test_numbered_steps_in_a_batch(either: SessionService) -> None:
    """A resend of the last applied step gets its kept result (nothing runs again), the
    same number with other inputs is StepMismatch, a number ahead is StepOutOfOrder, and
    the next number applies, all in one batch."""
    done, other, ahead, fresh = await new_sessions(either, 4)
    first = await either.step(done, X + 1, None, 0)
    await either.step(other, X + 1, None, 0)
    items: list[BulkStep | BaseException] = [
        BulkStep(done, X + 1, None, 0),
        BulkStep(other, X + 2, None, 0),
        BulkStep(ahead, X, None, 3),
        BulkStep(fresh, X, None, 0),
    ]
    replayed, mismatch, out_of_order, applied = await step_all(either, "stacked", items)
    assert isinstance(replayed, StepResult) and replayed.step == 1
    for got, want in zip(outputs_of(replayed), outputs_of(first), strict=True):
        np.testing.assert_array_equal(got, want)
    assert isinstance(mismatch, StepMismatch) and isinstance(out_of_order, StepOutOfOrder)
    assert isinstance(applied, StepResult) and applied.step == 1
    assert [(await either.get(s)).step for s in (done, other, ahead, fresh)] == [1, 1, 0, 1]


async def test_models_tenants_and_bad_values_fail_only_their_step(sessions: Any) -> None:
    """A session on another model, another tenant's session, a NaN and a value beyond
    float32 are each their own step's error (named as a single step names it); the others
    in the batch apply."""
    acme, beta = Caller("acme"), Caller("beta")
    mine, mine2, mine3, bad_values = await new_sessions(sessions, 4, caller=acme)
    theirs = client_id((await sessions.create("stacked", caller=beta)).session_id)
    elsewhere = client_id((await sessions.create("simple", caller=acme)).session_id)
    nan = np.array([[0.0, np.nan, 0.0]], np.float32)
    huge = np.array([0.0, 0.0, 1e39])
    items: list[BulkStep | BaseException] = [
        BulkStep(mine, X),
        BulkStep(theirs, X),
        BulkStep(elsewhere, X),
        BulkStep(bad_values, nan),
        BulkStep(mine2, huge),
        BulkStep(mine3, X + 1),
    ]
    outcomes = await step_all(sessions, "stacked", items, acme)
    assert isinstance(outcomes[0], StepResult) and isinstance(outcomes[5], StepResult)
    assert isinstance(outcomes[1], SessionNotFound)
    assert isinstance(outcomes[2], SessionNotOnModel)
    assert isinstance(outcomes[3], InvalidInput) and outcomes[3].field == "inputs[0][1]"
    assert isinstance(outcomes[4], InvalidInput) and outcomes[4].field == "inputs[2]"
    owners = ((mine, acme), (theirs, beta), (elsewhere, acme), (bad_values, acme), (mine2, acme))
    steps = [(await sessions.get(s, caller)).step for s, caller in owners]
    assert steps == [1, 0, 0, 0, 0]


def _racing(read: Any, other: SessionService, session_id: str) -> Any:
    """``read`` (a store's ``get_many``), after which ``other`` steps ``session_id``."""

    async def get_many(session_ids: Any) -> Any:
        records = await read(session_ids)
        if session_id in session_ids:  # the other replica's step lands now
            await other.step(session_id, X + 2)
        return records

    return get_many


async def test_a_write_lost_to_another_replica_is_recomputed(
    models_dir: Path, tiny_models: dict[str, Any], redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another replica steps a session between the batch's read and its write: the batch's
    compare-and-set loses for that session only, which is recomputed from the state the
    other replica wrote (its step is the session's second), not applied twice or lost."""
    async for one in serve(models_dir, redis_url):
        async for two in serve(models_dir, redis_url):
            a, b = one.services.sessions, two.services.sessions
            ids = await new_sessions(a, 3)
            ref = await new_sessions(a, 1)  # the same two steps, one after the other
            store: RedisSessionStore = a.store
            monkeypatch.setattr(store, "get_many", _racing(store.get_many, b, ids[1]))
            monkeypatch.setattr(store, "recent", lambda key: None)  # the path that reads
            outcomes = await step_all(a, "stacked", [BulkStep(s, X + 1) for s in ids])
            monkeypatch.undo()
            assert [o.step for o in outcomes] == [1, 2, 1]  # type: ignore[union-attr]
            await a.step(ref[0], X + 2)
            want = await a.step(ref[0], X + 1)
            for got, expected in zip(outputs_of(outcomes[1]), outputs_of(want), strict=True):
                np.testing.assert_allclose(got, expected, atol=ATOL)
            record = await a.get(ids[1])
            assert record.step == 2
            np.testing.assert_allclose(record.state, (await a.get(ref[0])).state, atol=ATOL)


async def test_a_session_busy_with_another_request_waits_its_turn(sessions: Any) -> None:
    """A session whose lock another request holds is stepped after that request, through
    the single path; the rest of the batch does not wait for it."""
    busy, free = await new_sessions(sessions, 2)
    await sessions.parts.locks.acquire(busy)
    task = asyncio.ensure_future(
        step_all(sessions, "stacked", [BulkStep(busy, X), BulkStep(free, X)])
    )

    async def free_stepped() -> bool:
        return (await sessions.get(free)).step == 1

    await until(free_stepped, "stepped the free session")
    assert not task.done()
    sessions.parts.locks.release(busy)
    outcomes = await asyncio.wait_for(task, 10)
    assert [o.step for o in all_instances(StepResult, outcomes)] == [1, 1]


async def test_cancelled_batch_releases_its_sessions(
    sessions: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client gone while its batch waits for the model: nothing is written, every
    session's lock is released and the sessions step normally afterwards."""
    ids = await new_sessions(sessions, 3)
    batcher = sessions.parts.batchers["stacked"]
    request = step_all(sessions, "stacked", [BulkStep(s, X) for s in ids])
    await cancel_while_waiting_on(batcher, "submit_many", request, monkeypatch)
    assert len(sessions.parts.locks) == 0
    assert [(await sessions.get(s)).step for s in ids] == [0, 0, 0]
    outcomes = await step_all(sessions, "stacked", [BulkStep(s, X) for s in ids])
    assert [o.step for o in all_instances(StepResult, outcomes)] == [1, 1, 1]


async def test_cancelling_cancels_every_step(
    sessions: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client gone mid-request: the later steps running on the single path are
    cancelled, queued ones never start."""
    started: list[str] = []
    cancelled: list[str] = []
    all_started = asyncio.Event()

    async def step(session_id: str, *args: Any, **kwargs: Any) -> Any:
        started.append(session_id)
        if len(started) == 3:
            all_started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(session_id)
            raise

    monkeypatch.setattr(sessions, "step", step)
    order = ("a", "b", "c", "a", "b", "c", "a")
    items: list[BulkStep | BaseException] = [BulkStep(sid, X) for sid in order]
    task = asyncio.ensure_future(step_all(sessions, "simple", items))
    await asyncio.wait_for(all_started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(10):  # each cancelled step runs once more to see its CancelledError
        await asyncio.sleep(0)
    assert sorted(cancelled) == ["a", "b", "c"] and started == ["a", "b", "c"]
