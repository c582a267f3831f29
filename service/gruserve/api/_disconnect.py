"""Cancel a request's work when its HTTP client disconnects (STYLE §2).

uvicorn does not cancel a handler whose client went away; it only reports
``http.disconnect`` on ``receive``. :func:`unless_disconnected` watches for that
message beside the work and cancels the work when it arrives, so a step
waiting in a session queue or a batch is dropped instead of computed for nobody.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from gruserve.api.errors import ClientDisconnected

T = TypeVar("T")


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` (body already read); raise ClientDisconnected if the client leaves first."""
    current = asyncio.current_task()
    if current is None:  # pragma: no cover - always inside a task under an ASGI server
        return await work
    watcher = asyncio.get_running_loop().create_task(_disconnected(request))
    gone = False

    def cancel(task: asyncio.Task[None]) -> None:
        nonlocal gone
        if not task.cancelled() and task.exception() is None:
            gone = True
            current.cancel()

    watcher.add_done_callback(cancel)
    try:
        return await work
    except asyncio.CancelledError:
        if gone and current.uncancel() == 0:
            raise ClientDisconnected from None
        raise
    finally:
        watcher.remove_done_callback(cancel)
        watcher.cancel()
