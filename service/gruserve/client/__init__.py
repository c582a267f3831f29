"""A Python client for gruserve: sessions with exactly-once steps, streams, predict.

::

    from gruserve.client import Client
    with Client("http://127.0.0.1:8000", api_key=None, timeout=5.0, retries=5) as c:
        s = c.create_session("demo")       # or session_id=..., initial_state=...
        y = s.step(x)                      # numpy [T, F] or [F] in, numpy out
        for y in s.stream(xs): ...         # one WebSocket, binary frames
        c.predict("demo", X)               # stateless, [batch, T, F]

:class:`AsyncClient` is the same API for asyncio (``await s.step(x)``,
``async for y in s.stream(xs)``).

Every step carries its number (the server's exactly-once ``"step"``), so the client can
resend it after a timeout, a dropped connection or a 502/503/504 without applying it
twice; requests are retried with exponential backoff, ``retries`` times. Errors the server
answers raise :class:`ApiError` subclasses named after its error type
(:mod:`gruserve.client.errors`).

Why httpx and websockets: both are in the base install, so the client needs no extra.
``websockets`` already comes with ``uvicorn[standard]`` and has a blocking and an asyncio
client; ``httpx`` was added to the base dependencies for the same reason, one library with
a blocking and an asyncio client of one API (timeouts, pooled keep-alive connections,
typed transport errors to retry on), so that the two clients here differ only in
``await``. It costs the base install two small pure-Python packages (httpx, httpcore)
and certifi; anyio, h11 and idna are there already for Starlette and uvicorn. The
standard library's urllib has no asyncio client and no connection reuse.
"""

from __future__ import annotations

from gruserve.client._async import AsyncClient, AsyncSession
from gruserve.client._sync import Client, Session
from gruserve.client._wire import Outputs
from gruserve.client.errors import (
    ApiError,
    ClientError,
    ConnectionLost,
    InvalidInput,
    ModelNotFound,
    SessionExists,
    SessionNotFound,
    StepOutOfOrder,
)

__all__ = [
    "ApiError",
    "AsyncClient",
    "AsyncSession",
    "Client",
    "ClientError",
    "ConnectionLost",
    "InvalidInput",
    "ModelNotFound",
    "Outputs",
    "Session",
    "SessionExists",
    "SessionNotFound",
    "StepOutOfOrder",
]
