"""``POST /v1/sessions/{id}/step`` as plain ASGI: the hot REST route without the framework.

The FastAPI route in :mod:`gruserve.api.v1` stays declared, so OpenAPI documents
it, but :class:`~gruserve.api.hot_paths.HotPaths` sends matching requests here
first. :class:`StepEndpoint` does what that route does, with the same pieces:
:func:`gruserve.api.decode.step_message` for the body (step number included), one
:meth:`~gruserve.sessions.service.SessionService.step` call,
:func:`gruserve.api.encode.step` for the reply, :func:`gruserve.api.errors.error_payload`
for every error (counted like the exception handlers count them), and the client's
disconnect cancels the step. It runs inside :class:`~gruserve.api._edge.EdgeMiddleware`
and the API-key check, so the byte limit, request ids, keys and HTTP metrics are the
same code as for every other route.

What it skips is per-request machinery that a step does not need: the framework's
outer layers, routing through every route's regex, dependency resolution,
``Request``/``Response`` objects and the exception-handler layers (measured in
``bench/README.md``).
"""

from __future__ import annotations

from starlette.types import Message, Receive, Scope, Send

from gruserve.api import decode, encode
from gruserve.api._disconnect import DisconnectWatch
from gruserve.api.errors import ClientDisconnected, error_payload
from gruserve.metrics import Metrics
from gruserve.sessions.service import SessionService

_JSON = b"application/json"


class StepEndpoint:
    """ASGI app answering ``POST /v1/sessions/{session_id}/step`` (``scope["path_params"]``).

    Args:
        sessions: the session service the route calls.
        metrics: collectors; errors are counted by type as ``api/errors.py`` counts them.
    """

    def __init__(self, sessions: SessionService, metrics: Metrics) -> None:
        self.sessions, self.metrics = sessions, metrics
        self.disconnects = DisconnectWatch()
        self.taken = 0
        """Requests answered here (tests check that this path is the one taken)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.taken += 1
        try:
            inputs, mask, number = decode.step_message(await _body(receive))
            work = self.sessions.step(scope["path_params"]["session_id"], inputs, mask, number)
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
