"""``step_all``: order within a session, errors passed through, cancellation reaching every step.

The session service is the production one; its ``step`` is wrapped to record calls (or to
hang until cancelled) so that what ``step_all`` does with it can be observed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import serve
from gruserve.errors import InvalidInput, SessionNotFound
from gruserve.sessions.bulk import BulkStep, step_all

X = np.zeros((1, 3), np.float32)


@pytest.fixture
async def sessions(models_dir: Path, tiny_models: dict[str, Any]) -> AsyncIterator[Any]:
    """The session service of an app built by the production factory (memory store)."""
    async for served in serve(models_dir):
        yield served.services.sessions


async def test_order_within_a_session_and_errors_in_place(
    sessions: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
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
    assert [v for sid, v in calls if sid == a] == [1, 3, 5]


async def test_cancelling_cancels_every_step(
    sessions: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client gone mid-request: running steps are cancelled, queued ones never start."""
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
    items: list[BulkStep | BaseException] = [BulkStep(sid, X) for sid in ("a", "b", "c", "a")]
    task = asyncio.ensure_future(step_all(sessions, "simple", items))
    await asyncio.wait_for(all_started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(10):  # each cancelled step runs once more to see its CancelledError
        await asyncio.sleep(0)
    assert sorted(cancelled) == ["a", "b", "c"] and started == ["a", "b", "c"]
