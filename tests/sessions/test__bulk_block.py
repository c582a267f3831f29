"""``step_bulk`` with a :class:`PlainBlock`: the array path against single steps, both stores.

The session service is the production one (built by the app factory, real stores, a real
Redis). Reference results are the same steps sent one at a time through
``SessionService.step`` on sessions of their own. Where a test needs to see which path a
step took or to put a second writer between a read and a write, it wraps a method of the
service, batcher or store around the real one.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import cancel_while_waiting_on, new_sessions, outputs_of, serve, until
from gruserve.errors import InvalidInput, SessionNotFound, SessionNotOnModel
from gruserve.runtime.batcher import Batcher
from gruserve.sessions.bulk import BulkStep, PlainBlock, step_bulk
from gruserve.sessions.owner import Caller
from gruserve.sessions.redis_store import RedisSessionStore
from gruserve.sessions.service import SessionService

ATOL = 1e-6


@pytest.fixture
def blocks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The rows of each block the batcher is given (so a test sees the array path ran)."""
    seen: list[int] = []
    real = Batcher.submit_block

    async def submit_block(self: Batcher, inputs: np.ndarray, states: np.ndarray) -> Any:
        seen.append(inputs.shape[0])
        return await real(self, inputs, states)

    monkeypatch.setattr(Batcher, "submit_block", submit_block)
    return seen


def _block(entries: list[tuple[int, str, np.ndarray]]) -> PlainBlock:
    return PlainBlock(
        [p for p, _, _ in entries],
        [s for _, s, _ in entries],
        np.stack([x for _, _, x in entries]).astype(np.float32),
    )


def _rows(answer: Any, block: PlainBlock, row: int) -> list[np.ndarray]:
    """Row ``row``'s outputs from the block answer."""
    slot = answer.slot[row]
    assert slot >= 0, f"row {row} was not answered by the block"
    return [o[slot] for o in answer.outputs]


async def test_block_and_other_steps_equal_single_steps(
    either: SessionService, rng: np.random.Generator, blocks: list[int]
) -> None:
    """A request mixing block rows (one session twice), a numbered step, a step of
    another length, an unknown session and one on another model gives, step for step,
    what the same steps sent one at a time give: outputs, step counts, states; the
    errors stay in their places and the rest apply."""
    ids, twins = await new_sessions(either, 4), await new_sessions(either, 4)
    elsewhere = (await new_sessions(either, 1, "simple"))[0]
    x = rng.normal(size=(9, 2, 3)).astype(np.float32)
    block = _block(
        [
            (0, ids[0], x[0]),
            (1, ids[1], x[1]),
            (3, ids[0], x[3]),  # the same session again: after its first step
            (4, "nobody", x[4]),
            (5, elsewhere, x[5]),
            (7, ids[3], x[7]),
        ]
    )
    steps: list[BulkStep | BaseException | None] = [
        None,
        None,
        BulkStep(ids[2], x[2], None, 0),  # numbered: the batch path
        None,
        None,
        None,
        BulkStep(ids[1], x[6, :1]),  # another length, and B's second step
        None,
    ]
    outcomes, answer = await step_bulk(either, "stacked", steps, block=block)
    assert answer is not None and blocks == [3]  # ids[0], ids[1], ids[3] ran as one block
    assert isinstance(outcomes[4], SessionNotFound)
    assert isinstance(outcomes[5], SessionNotOnModel)
    twin = dict(zip(ids, twins, strict=True))
    plan = [(0, ids[0], x[0], None), (1, ids[1], x[1], None), (2, ids[2], x[2], 0)]
    plan += [(3, ids[0], x[3], None), (6, ids[1], x[6, :1], None), (7, ids[3], x[7], None)]
    row_of = {p: r for r, p in enumerate(block.positions)}
    for position, sid, inputs, number in plan:
        single = await either.step(twin[sid], inputs, None, number)
        outcome = outcomes[position]
        if outcome is None:  # answered in the block
            outs, step = (
                _rows(answer, block, row_of[position]),
                answer.steps[answer.slot[row_of[position]]],
            )
        else:
            outs, step = outputs_of(outcome), outcome.step  # type: ignore[union-attr]
        assert step == single.step
        for g, w in zip(outs, outputs_of(single), strict=True):
            assert g.shape == w.shape
            np.testing.assert_allclose(g, w, atol=ATOL)
    for b, s in zip(ids, twins, strict=True):
        got, want = await either.get(b), await either.get(s)
        assert (got.step, got.timesteps, got.revision) == (want.step, want.timesteps, want.revision)
        np.testing.assert_allclose(got.state, want.state, atol=ATOL)
    assert (await either.get(elsewhere)).step == 0


async def test_a_bad_value_sends_the_block_to_the_batch_path(
    sessions: SessionService, blocks: list[int]
) -> None:
    """A NaN in one row: the block is not run as one; the batch path names the bad value
    as a single step does, and the other rows apply."""
    a, b, c = await new_sessions(sessions, 3)
    x = np.zeros((3, 1, 3), np.float32)
    x[1, 0, 1] = np.nan
    block = PlainBlock([0, 1, 2], [a, b, c], x)
    outcomes, answer = await step_bulk(sessions, "stacked", [None, None, None], block=block)
    assert blocks == [] and answer is not None and answer.slot == [-1, -1, -1]
    assert isinstance(outcomes[1], InvalidInput) and outcomes[1].field == "inputs[0][1]"
    assert [o.step for o in (outcomes[0], outcomes[2])] == [1, 1]  # type: ignore[union-attr]
    assert [(await sessions.get(s)).step for s in (a, b, c)] == [1, 0, 1]


async def test_tenants_and_history(models_dir: Path, tiny_models: dict[str, Any]) -> None:
    """Another tenant's session is not found; the kept inputs (history on) and the
    records equal those of single steps."""
    async for served in serve(models_dir, session_history=8):
        sessions = served.services.sessions
        acme, beta = Caller("acme"), Caller("beta")
        mine, twin = await new_sessions(sessions, 2, caller=acme)
        theirs = (await new_sessions(sessions, 1, caller=beta))[0]
        x = np.arange(12, dtype=np.float32).reshape(2, 2, 3) / 10
        for t in range(2):
            block = PlainBlock([0, 1], [mine, theirs], x[t : t + 1].repeat(2, axis=0))
            outcomes, answer = await step_bulk(sessions, "stacked", [None, None], acme, block)
            assert isinstance(outcomes[1], SessionNotFound)
            assert answer is not None and answer.steps == [t + 1]
            await sessions.step(twin, x[t], caller=acme)
        got, want = await sessions.get(mine, acme), await sessions.get(twin, acme)
        assert got.history is not None and got.history == want.history
        np.testing.assert_allclose(got.state, want.state, atol=ATOL)
        assert (await sessions.get(theirs, beta)).step == 0


def _racing(read: Any, other: SessionService, session_id: str) -> Any:
    """``read`` (a store's ``get_many``), after whose first read of ``session_id`` ``other``
    steps it."""
    raced: list[bool] = []

    async def get_many(session_ids: Any) -> Any:
        records = await read(session_ids)
        if session_id in session_ids and not raced:  # the other replica's step lands now
            raced.append(True)
            await other.step(session_id, np.full((1, 3), 2, np.float32))
        return records

    return get_many


async def test_a_write_lost_to_another_replica_is_recomputed(
    models_dir: Path,
    tiny_models: dict[str, Any],
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    blocks: list[int],
) -> None:
    """Another replica steps a session between the block's read and its write: that row's
    compare-and-set loses, and it is recomputed from the other replica's state (its step
    is the session's second), not applied twice or lost."""
    async for one in serve(models_dir, redis_url):
        async for two in serve(models_dir, redis_url):
            a, b = one.services.sessions, two.services.sessions
            ids = await new_sessions(a, 3)
            ref = (await new_sessions(a, 1))[0]
            store: RedisSessionStore = a.store
            monkeypatch.setattr(store, "get_many", _racing(store.get_many, b, ids[1]))
            monkeypatch.setattr(store, "recent", lambda key: None)  # the path that reads
            x = np.ones((3, 1, 3), np.float32)
            block = PlainBlock([0, 1, 2], list(ids), x)
            outcomes, answer = await step_bulk(a, "stacked", [None] * 3, block=block)
            assert answer is not None and answer.slot[1] == -1 and blocks[0] == 3
            assert answer.steps == [1, 1] and outcomes[1].step == 2  # type: ignore[union-attr]
            await a.step(ref, np.full((1, 3), 2, np.float32))
            want = await a.step(ref, x[1])
            for got, expected in zip(outputs_of(outcomes[1]), outputs_of(want), strict=True):
                np.testing.assert_allclose(got, expected, atol=ATOL)
            np.testing.assert_allclose((await a.get(ids[1])).state, (await a.get(ref)).state)


async def test_a_busy_session_waits_and_a_cancelled_block_releases_its_locks(
    sessions: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row whose session another request holds is stepped after it (the rest of the
    block does not wait); a client gone while its block waits for the model writes
    nothing and releases every lock."""
    busy, free = await new_sessions(sessions, 2)
    x = np.zeros((2, 1, 3), np.float32)
    await sessions.parts.locks.acquire(busy)
    block = PlainBlock([0, 1], [busy, free], x)
    task = asyncio.ensure_future(step_bulk(sessions, "stacked", [None, None], block=block))

    async def free_stepped() -> bool:
        return (await sessions.get(free)).step == 1

    await until(free_stepped, "stepped the free session")
    assert not task.done()
    sessions.parts.locks.release(busy)
    outcomes, answer = await asyncio.wait_for(task, 10)
    assert answer is not None and answer.steps == [1] and outcomes[0].step == 1  # type: ignore[union-attr]

    batcher = sessions.parts.batchers["stacked"]
    request = step_bulk(sessions, "stacked", [None, None], block=block)
    await cancel_while_waiting_on(batcher, "submit_block", request, monkeypatch)
    assert len(sessions.parts.locks) == 0
    assert [(await sessions.get(s)).step for s in (busy, free)] == [1, 1]
