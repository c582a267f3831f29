"""``POST /v1/sessions/{id}/step`` as plain ASGI: the hot REST route without the framework.

The FastAPI route in :mod:`gruserve.api.v1` stays declared, so OpenAPI documents
it, but :class:`StepFastPath` answers matching requests first. It does what that
route does, with the same pieces: :func:`gruserve.api.decode.step_message` for
the body (step number included), one
:meth:`~gruserve.sessions.service.SessionService.step` call,
:func:`gruserve.api.encode.step` for the reply, :func:`gruserve.api.errors.error_payload`
for every error (counted like the exception handlers count them), and the client's
disconnect cancels the step. It sits inside :class:`~gruserve.api._edge.EdgeMiddleware`
and the API-key check, so the byte limit, request ids, keys and HTTP metrics are the
same code as for every other route (``scope["route"]`` is set to the declared route).

What it skips is per-request machinery that a step does not need: routing through
every route's regex, dependency resolution, ``Request``/``Response`` objects and
the exception-handler layers (measured in ``bench/README.md``). A request it does
not recognise (another method, a ``root_path`` prefix) goes on to FastAPI unchanged.
"""

from __future__ import annotations

import re

from fastapi import FastAPI
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gruserve.api import decode, encode, v1
from gruserve.api._disconnect import DisconnectWatch
from gruserve.api.errors import ClientDisconnected, error_payload
from gruserve.metrics import Metrics
from gruserve.services import Services
from gruserve.sessions.service import SessionService

PATH = re.compile(r"^/v1/sessions/(?P<session_id>[^/]+)/step$")
_JSON = b"application/json"


class StepFastPath:
    """Middleware answering ``POST /v1/sessions/{session_id}/step``; everything else passes on.

    Args:
        app: the rest of the ASGI stack.
        sessions: the session service the route calls.
        route: the declared FastAPI route, named in ``scope["route"]`` for the HTTP metrics.
        metrics: collectors; errors are counted by type as ``api/errors.py`` counts them.
    """

    def __init__(
        self, app: ASGIApp, sessions: SessionService, route: BaseRoute, metrics: Metrics
    ) -> None:
        self.app, self.sessions, self.route, self.metrics = app, sessions, route, metrics
        self.disconnects = DisconnectWatch()
        self.taken = 0
        """Requests answered here (tests check that the fast path is the one taken)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        match = PATH.match(scope["path"])
        if match is None:
            await self.app(scope, receive, send)
            return
        self.taken += 1
        scope["route"] = self.route
        try:
            inputs, mask, number = decode.step_message(await _body(receive))
            work = self.sessions.step(match["session_id"], inputs, mask, number)
            result = await self.disconnects.run(receive, work)
            status, body = 200, encode.dumps(encode.step(result))
        except Exception as exc:  # every error gets the one JSON shape, as in api/errors.py
            status, payload = error_payload(exc)
            self.metrics.errors.labels(payload["error"]["type"]).inc()
            body = encode.dumps(payload)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-length", b"%d" % len(body)), (b"content-type", _JSON)],
            }
        )
        await send({"type": "http.response.body", "body": body})


def install(app: FastAPI, services: Services) -> None:
    """Add :class:`StepFastPath` for the app's declared step route (call before the edge)."""
    route = next(r for r in v1.router.routes if getattr(r, "endpoint", None) is v1.step)
    app.add_middleware(
        StepFastPath, sessions=services.sessions, route=route, metrics=services.metrics
    )


async def _body(receive: Receive) -> bytes:
    """The whole request body (the edge's byte limit applies inside ``receive``)."""
    message: Message = await receive()
    if message["type"] != "http.request":
        raise ClientDisconnected
    body = message.get("body", b"")
    if not message.get("more_body", False):
        return body  # type: ignore[no-any-return]
    parts = [body]
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnected
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)
