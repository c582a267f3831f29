"""A client that disconnects cancels the work it was waiting for."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.requests import Request

from gruserve.api.errors import ClientDisconnected
from gruserve.api.protocols._disconnect import DisconnectWatch, unless_disconnected


def _receive(disconnect_after: float | None) -> Any:
    """An ASGI ``receive`` whose client leaves after ``disconnect_after`` s (None: stays)."""

    async def receive() -> dict[str, Any]:
        if disconnect_after is None:
            await asyncio.Event().wait()  # the client stays
        await asyncio.sleep(disconnect_after or 0)
        return {"type": "http.disconnect"}

    return receive


def _request(disconnect_after: float | None) -> Request:
    return Request(
        {"type": "http", "method": "POST", "path": "/", "headers": []}, _receive(disconnect_after)
    )


async def _slow_step(cancelled: asyncio.Event) -> str:
    """Work that takes long and records being cancelled."""
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        cancelled.set()
        raise
    return "done"


async def test_work_is_cancelled_when_the_client_leaves() -> None:
    cancelled = asyncio.Event()
    with pytest.raises(ClientDisconnected):
        await unless_disconnected(_request(0.01), _slow_step(cancelled))
    assert cancelled.is_set()


async def test_work_finishes_when_the_client_stays() -> None:
    async def quick_step() -> str:
        await asyncio.sleep(0.01)
        return "done"

    assert await unless_disconnected(_request(None), quick_step()) == "done"
    await asyncio.sleep(0)  # let the cancelled watcher finish
    assert len([t for t in asyncio.all_tasks() if not t.done()]) == 1  # the watcher is gone


# -- DisconnectWatch: one timer for many requests --------------------------------------------
async def test_watch_cancels_work_whose_client_left() -> None:
    watch = DisconnectWatch(grace_s=0.01)
    cancelled = asyncio.Event()
    with pytest.raises(ClientDisconnected):
        await asyncio.wait_for(watch.run(_receive(0.02), _slow_step(cancelled)), 5)
    assert cancelled.is_set() and watch.watching == 0


async def test_watch_leaves_quick_work_unwatched_and_slow_work_alone() -> None:
    watch = DisconnectWatch(grace_s=0.02)

    async def step(seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds

    staying = _receive(None)
    results = await asyncio.gather(
        *(watch.run(staying, step(0.001)) for _ in range(20)), watch.run(staying, step(0.1))
    )
    assert results == [0.001] * 20 + [0.1]
    assert watch.watching == 0
    # the sweep stops once nothing waits, and the cancelled watcher ends: wait for it, as
    # long as a busy machine needs
    for _ in range(3000):
        if len([t for t in asyncio.all_tasks() if not t.done()]) == 1:
            break
        await asyncio.sleep(0.01)
    assert len([t for t in asyncio.all_tasks() if not t.done()]) == 1


async def test_watch_only_starts_watchers_after_the_grace_period(watchers: list[Any]) -> None:
    watch = DisconnectWatch(grace_s=0.3)  # the quick one ends 0.3 s within it
    quick, slow = _receive(None), _receive(None)
    await asyncio.gather(watch.run(quick, asyncio.sleep(0)), watch.run(slow, asyncio.sleep(0.6)))
    assert watchers == [slow]


async def test_an_outer_cancellation_is_not_a_disconnect() -> None:
    watch = DisconnectWatch(grace_s=0.01)
    task = asyncio.ensure_future(watch.run(_receive(None), asyncio.sleep(10)))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert watch.watching == 0


def test_grace_is_validated() -> None:
    with pytest.raises(ValueError, match="Received: grace_s=0"):
        DisconnectWatch(grace_s=0)
