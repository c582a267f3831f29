"""A client that disconnects cancels the work it was waiting for."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.requests import Request

from gruserve.api._disconnect import unless_disconnected
from gruserve.api.errors import ClientDisconnected


def _request(disconnect_after: float | None) -> Request:
    async def receive() -> dict[str, Any]:
        if disconnect_after is None:
            await asyncio.Event().wait()  # the client stays
        await asyncio.sleep(disconnect_after or 0)
        return {"type": "http.disconnect"}

    return Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)


async def test_work_is_cancelled_when_the_client_leaves() -> None:
    cancelled = asyncio.Event()

    async def slow_step() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "done"

    with pytest.raises(ClientDisconnected):
        await unless_disconnected(_request(0.01), slow_step())
    assert cancelled.is_set()


async def test_work_finishes_when_the_client_stays() -> None:
    async def quick_step() -> str:
        await asyncio.sleep(0.01)
        return "done"

    assert await unless_disconnected(_request(None), quick_step()) == "done"
    await asyncio.sleep(0)  # let the cancelled watcher finish
    assert len([t for t in asyncio.all_tasks() if not t.done()]) == 1  # the watcher is gone
